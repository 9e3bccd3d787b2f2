"""The eval transform against the official preprocessing outputs, plus decoding edge cases."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ernievil2_train.vision import ImageDecodeError, ImageTooLarge, eval_transform
from ernievil2_train.vision.transforms import (
    MEAN,
    STD,
    crop_offsets,
    decode_bytes,
    normalize,
    normalize_crops,
    scaled_size,
)
from tests.checkpoints.reference import load_npz, preprocessed_rows

NOAUG = "__noaug"


@pytest.fixture(scope="module")
def preprocessing(paddle_ref: Path) -> dict:
    return json.loads((paddle_ref / "config.json").read_text())["preprocessing"]


@pytest.fixture(scope="module")
def size(preprocessing: dict) -> int:
    return preprocessing["crop_size"]


@pytest.fixture(scope="module")
def short(preprocessing: dict) -> int:
    return preprocessing["short_size"]


@pytest.fixture(scope="module")
def cases(paddle_ref: Path) -> list[dict]:
    return json.loads((paddle_ref / "preprocess_cases.json").read_text())


def _encode(rgb: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    small = rng.integers(0, 256, size=(max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def test_matches_official_outputs(paddle_ref: Path, size: int, short: int) -> None:
    ref = np.load(paddle_ref / "preprocess.npz")
    assert ref.files
    transforms = {
        True: eval_transform(size, short_size=short),
        False: eval_transform(size, keep_aspect=False, short_size=short),
    }
    for key in ref.files:
        name = key.removesuffix(NOAUG)
        data = (paddle_ref / name).read_bytes()
        out = transforms[not key.endswith(NOAUG)](data)
        assert out.dtype == torch.float32
        assert out.shape == ref[key].shape[1:]
        np.testing.assert_array_equal(out.numpy(), ref[key][0], err_msg=key)


def test_every_case_has_its_official_outputs(paddle_ref: Path, cases: list[dict]) -> None:
    keys = set(np.load(paddle_ref / "preprocess.npz").files)
    assert cases
    named = {case["file"] for case in cases} | {case["noaug_key"] for case in cases if "noaug_key" in case}
    assert keys == named
    for case in cases:
        assert hashlib.sha256((paddle_ref / case["file"]).read_bytes()).hexdigest() == case["sha256"]


def test_crops_normalised_as_a_batch_are_official(paddle_ref: Path, size: int, short: int) -> None:
    """`crop` (uint8, what the eval loaders hand over) then `normalize_crops` of the stacked batch: the
    official floats bit for bit, as the one-image transform gives them."""
    ref = np.load(paddle_ref / "preprocess.npz")
    transforms = {
        True: eval_transform(size, short_size=short),
        False: eval_transform(size, keep_aspect=False, short_size=short),
    }
    keys = list(ref.files)
    crops = [transforms[not key.endswith(NOAUG)].crop((paddle_ref / key.removesuffix(NOAUG)).read_bytes())
             for key in keys]
    assert all(crop.dtype == torch.uint8 for crop in crops)
    batch = normalize_crops(torch.stack(crops))
    assert batch.dtype == torch.float32
    for key, out in zip(keys, batch, strict=True):
        np.testing.assert_array_equal(out.numpy(), ref[key][0], err_msg=key)


def test_model_inputs_are_the_official_preprocessing(paddle_ref: Path, size: int, short: int) -> None:
    """The pixel_values rows made from image files, bit for bit (the other rows are random)."""
    rows = preprocessed_rows(paddle_ref)
    assert rows
    pixels = load_npz(paddle_ref / "inputs.npz")["pixel_values"]
    transform = eval_transform(size, short_size=short)
    for row, name in rows.items():
        np.testing.assert_array_equal(transform(paddle_ref / name).numpy(), pixels[row], err_msg=name)


def test_constants_match_the_reference(preprocessing: dict) -> None:
    np.testing.assert_array_equal(MEAN, np.array(preprocessing["mean"], dtype=np.float64))
    np.testing.assert_array_equal(STD, np.array(preprocessing["std"], dtype=np.float64))
    assert preprocessing["channel_order"] == "RGB"
    assert preprocessing["interpolation"] == "cv2.INTER_LINEAR"


def test_pil_and_path_inputs_match_bytes(paddle_ref: Path, cases: list[dict], size: int) -> None:
    transform = eval_transform(size)
    for case in cases:
        path = paddle_ref / case["file"]
        expected = transform(path.read_bytes())
        with Image.open(path) as image:
            assert torch.equal(transform(image), expected), case["file"]
        assert torch.equal(transform(path), expected)
        assert torch.equal(transform(str(path)), expected)


def test_sizes_and_crop_offsets(paddle_ref: Path, cases: list[dict], size: int, short: int) -> None:
    assert cases
    for case in cases:
        with Image.open(paddle_ref / case["file"]) as image:
            assert list(image.size) == case["file_size"], case["file"]
        rgb = decode_bytes((paddle_ref / case["file"]).read_bytes())
        assert list(rgb.shape) == [*case["decoded_hw"], 3]
        if case.get("kind") == "gray":
            assert (rgb == rgb[..., :1]).all(), case["file"]
        height, width = case["decoded_hw"]
        new_w, new_h = scaled_size(width, height, short)
        assert [new_h, new_w] == case["scaled_hw"], case["file"]
        assert crop_offsets(new_w, new_h, size) == (case["crop_x1"], case["crop_y1"]), case["file"]


@pytest.mark.parametrize(
    ("source", "scaled"),
    [
        ((640, 427), (336, 224)),
        ((300, 500), (224, 374)),
        ((100, 80), (281, 224)),
        ((333, 256), (292, 224)),
        ((300, 300), (225, 224)),
        ((224, 224), (224, 224)),
        ((224, 500), (224, 500)),
        ((500, 224), (500, 224)),
    ],
)
def test_scale_rule_table(source: tuple[int, int], scaled: tuple[int, int]) -> None:
    assert scaled_size(*source, 224) == scaled


def test_short_size_larger_than_the_crop() -> None:
    rng = np.random.default_rng(8)
    rgb = _smooth_image(rng, 40, 60)
    new_w, new_h = scaled_size(60, 40, 36)
    x1, y1 = crop_offsets(new_w, new_h, 32)
    scaled = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    expected = normalize(np.ascontiguousarray(scaled[y1 : y1 + 32, x1 : x1 + 32]))
    assert torch.equal(eval_transform(32, short_size=36)(_encode(rgb)), expected)
    assert not torch.equal(eval_transform(32)(_encode(rgb)), expected)
    with pytest.raises(ValueError, match="smaller than the crop size"):
        eval_transform(32, short_size=31)


def test_short_side_already_target_is_only_cropped() -> None:
    rng = np.random.default_rng(0)
    size = 32
    rgb = rng.integers(0, 256, size=(size, 71, 3), dtype=np.uint8)
    x1 = -(-(71 - size) // 2)
    expected = normalize(np.ascontiguousarray(rgb[:, x1 : x1 + size]))
    assert torch.equal(eval_transform(size)(_encode(rgb)), expected)


def test_other_image_sizes() -> None:
    rng = np.random.default_rng(1)
    data = _encode(_smooth_image(rng, 50, 90))
    for size in (16, 33, 64, 200):
        assert eval_transform(size)(data).shape == (3, size, size)
        assert eval_transform(size, keep_aspect=False)(data).shape == (3, size, size)


def test_normalization_recipe_is_bit_exact() -> None:
    rgb = np.random.default_rng(2).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    x = rgb.astype(np.float32).transpose(2, 0, 1) / np.float32(255)
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    x = (x.astype(np.float64) - mean).astype(np.float32)
    x = (x.astype(np.float64) / std).astype(np.float32)
    np.testing.assert_array_equal(normalize(rgb).numpy(), x)


def _jpeg_with_orientation(rgb: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(rgb, "JPEG", quality=95, exif=exif.tobytes())


ORIENT_TO_UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(ORIENT_TO_UPRIGHT))
def test_exif_orientation(orientation: int) -> None:
    data = _jpeg_with_orientation(_smooth_image(np.random.default_rng(orientation), 48, 80), orientation)
    stored = cv2.cvtColor(
        cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION),
        cv2.COLOR_BGR2RGB,
    )
    upright = np.ascontiguousarray(ORIENT_TO_UPRIGHT[orientation](stored))
    transform = eval_transform(32)
    expected = transform(_encode(upright))
    assert torch.equal(transform(data), expected)
    with Image.open(io.BytesIO(data)) as image:
        assert torch.equal(transform(image), expected)


def test_rgba_drops_alpha_without_compositing() -> None:
    rng = np.random.default_rng(3)
    rgb = _smooth_image(rng, 40, 60)
    alpha = rng.integers(0, 256, size=(40, 60, 1), dtype=np.uint8)
    rgba = _encode(np.concatenate([rgb, alpha], axis=2))
    transform = eval_transform(32)
    assert torch.equal(transform(rgba), transform(_encode(rgb)))
    with Image.open(io.BytesIO(rgba)) as image:
        assert image.mode == "RGBA"
        assert torch.equal(transform(image), transform(_encode(rgb)))


def test_grayscale_becomes_three_equal_channels() -> None:
    gray = _smooth_image(np.random.default_rng(4), 40, 60)[..., 0]
    transform = eval_transform(32)
    out = transform(_encode(gray))
    assert torch.equal(out, transform(_encode(np.repeat(gray[..., None], 3, axis=2))))
    with Image.open(io.BytesIO(_encode(gray))) as image:
        assert torch.equal(transform(image), out)


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", bytes(range(256)) * 4, "truncated-png", "garbage-after-jpeg-magic"],
)
def test_corrupt_bytes_raise_decode_error(data: bytes | str) -> None:
    if data == "truncated-png":
        data = _encode(_smooth_image(np.random.default_rng(5), 40, 60))[:60]
    elif data == "garbage-after-jpeg-magic":
        data = b"\xff\xd8\xff\xe0" + bytes(200)
    with pytest.raises(ImageDecodeError):
        eval_transform(32)(data)
    assert issubclass(ImageDecodeError, ValueError)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))


@pytest.mark.parametrize("side", [10_000, 30_000])
def test_decompression_bomb_rejected_from_header(side: int) -> None:
    """Refused as too large from its header, without PIL's warning about it (under the error it becomes at
    twice the limit)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageTooLarge, match=r"too large|exceeds"):
            eval_transform(32)(_png_header_only(side, side))


def test_pixel_limit_is_configurable() -> None:
    data = _encode(_smooth_image(np.random.default_rng(6), 40, 60))
    with pytest.raises(ImageDecodeError, match="exceeds"):
        eval_transform(32, max_pixels=40 * 60 - 1)(data)
    with Image.open(io.BytesIO(data)) as image, pytest.raises(ImageDecodeError, match="exceeds"):
        eval_transform(32, max_pixels=40 * 60 - 1)(image)
    assert eval_transform(32, max_pixels=40 * 60)(data).shape == (3, 32, 32)


def test_a_thin_strip_is_refused_before_its_short_side_is_scaled_up() -> None:
    """1x40000 pixels pass the decode limit, but scaling the short side to 224 would allocate ~6 GB."""
    data = _encode(np.zeros((40_000, 1, 3), np.uint8))
    message = r"1x40000 pixels would be scaled to 224x8960001, over the limit"
    with pytest.raises(ImageTooLarge, match=message):
        eval_transform(224)(data)
    assert eval_transform(224)(_encode(np.zeros((400, 1, 3), np.uint8))).shape == (3, 224, 224)


def test_a_short_side_that_makes_every_image_too_large_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match=r"^short_size 101 scales every image to more than the limit of "
                                         r"10000 pixels \(at most 100\)$"):
        eval_transform(32, max_pixels=10_000, short_size=101)
    assert eval_transform(32, max_pixels=10_000, short_size=100).short_size == 100


@pytest.mark.parametrize("arguments", [{"image_size": 0}, {"image_size": -5}, {"max_pixels": 0}])
def test_sizes_must_be_positive(arguments: dict) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        eval_transform(**arguments)


def test_picklable() -> None:
    transform = eval_transform(32, keep_aspect=False)
    data = _encode(_smooth_image(np.random.default_rng(7), 40, 60))
    assert torch.equal(pickle.loads(pickle.dumps(transform))(data), transform(data))
