"""Training views and the eval-style center view: shapes, draft-reduced decode, each augmentation."""

from __future__ import annotations

import io
import math
import random

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ernievil2_train.perf import count_host_syncs
from ernievil2_train.vision import augment
from ernievil2_train.vision.augment import (
    MEAN,
    STD,
    CenterView,
    TrainViews,
    decode_rgb,
    draft_factor,
    normalize_uint8,
    oriented_size,
)
from tests.data.shard_helpers import smooth_image

PLAIN = {"flip_p": 0.0, "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0}


def lazy(image: Image.Image, fmt: str = "JPEG", **kw) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return Image.open(io.BytesIO(buf.getvalue()))


def denormalize(x: torch.Tensor) -> np.ndarray:
    """float [3,S,S] -> 0..255 float HWC."""
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return ((x * std + mean) * 255).permute(1, 2, 0).numpy()


@pytest.mark.parametrize(("side", "size", "factor"), [(224, 224, 1), (447, 224, 1), (448, 224, 2),
                                                       (900, 224, 4), (1792, 224, 8), (10**5, 224, 8),
                                                       (100, 224, 1)])
def test_draft_factor_keeps_crop_at_output_resolution(side, size, factor):
    assert draft_factor(side, size) == factor
    assert side / factor >= size or factor == 1


def test_decode_rgb_draft_reduces_jpeg_only():
    source = smooth_image(400, 300, 0)
    assert decode_rgb(lazy(source), 4).shape == (75, 100, 3)
    assert decode_rgb(lazy(source), 1).shape == (300, 400, 3)
    assert decode_rgb(lazy(source, "PNG"), 4).shape == (300, 400, 3)


def test_train_views_use_draft_but_never_upsample():
    seen = []

    class Recording(TrainViews):
        def view(self, array, box):
            seen.append((array.shape, min(box[2] - box[0], box[3] - box[1])))
            return super().view(array, box)

    random.seed(0)
    views = Recording(image_size=64, scale=(0.9, 1.0))
    out = views(lazy(smooth_image(2000, 1500, 1)))
    assert len(out) == 2
    assert seen[0][0] == (math.ceil(1500 / 8), math.ceil(2000 / 8), 3)
    for _ in range(30):
        views = Recording(image_size=64, scale=(0.05, 1.0))
        views(lazy(smooth_image(700, 500, 2)))
    assert all(short >= 64 - 1 for _, short in seen)
    assert any(shape[0] < 500 for shape, _ in seen)


@pytest.mark.parametrize("num_views", [1, 2])
def test_train_views_shapes_and_independence(num_views):
    random.seed(1)
    out = TrainViews(image_size=48, num_views=num_views)(lazy(smooth_image(120, 90, 3)))
    assert len(out) == num_views
    for x in out:
        assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and x.is_contiguous()
    if num_views == 2:
        assert not torch.equal(out[0], out[1])


def test_plain_view_is_resize_and_official_normalisation():
    source = smooth_image(160, 120, 4)
    views = TrainViews(image_size=40, num_views=1, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), **PLAIN)
    (x,) = views(lazy(source, "PNG"))
    pixels = cv2.resize(np.asarray(source), (40, 40), interpolation=cv2.INTER_AREA).astype(np.float32)
    expected = (pixels / 255 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_flip_mirrors_the_view():
    array = np.asarray(smooth_image(64, 64, 5))
    box = (0, 0, 64, 64)
    plain = TrainViews(image_size=32, **PLAIN).view(array, box)
    flipped = TrainViews(image_size=32, **{**PLAIN, "flip_p": 1.0}).view(array, box)
    torch.testing.assert_close(flipped, plain.flip(-1))


def test_brightness_and_contrast_follow_their_formulas():
    array = np.asarray(smooth_image(64, 64, 6))
    random.seed(2)
    base = denormalize(TrainViews(image_size=32, **PLAIN).view(array, (0, 0, 64, 64)))
    only = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}
    for name in ("brightness", "contrast"):
        views = TrainViews(image_size=32, **{**PLAIN, **only, "jitter_p": 1.0, name: 0.5})
        random.seed(3)
        matrix = views.colour_matrix(base.round().astype(np.uint8))
        factor = matrix[0, 0]
        assert 0.5 <= factor <= 1.5 and factor != 1
        np.testing.assert_allclose(matrix[:, :3], factor * np.eye(3), atol=1e-6)
        grey_mean = float(np.asarray([0.299, 0.587, 0.114]) @ base.round().reshape(-1, 3).mean(0))
        offset = 0.0 if name == "brightness" else (1 - factor) * grey_mean
        np.testing.assert_allclose(matrix[:, 3], offset, atol=1e-3)


def test_saturation_and_hue_keep_grey_and_luma():
    views = TrainViews(image_size=32, **{**PLAIN, "jitter_p": 1.0, "brightness": 0.0, "contrast": 0.0,
                                         "saturation": 0.5, "hue": 0.3})
    grey = np.array([100.0, 100.0, 100.0])
    colour = np.array([200.0, 40.0, 90.0])
    luma = np.array([0.299, 0.587, 0.114])
    changed = False
    for seed in range(5):
        random.seed(seed)
        matrix = views.colour_matrix(np.zeros((4, 4, 3), np.uint8)).astype(np.float64)
        np.testing.assert_allclose(matrix[:, :3] @ grey + matrix[:, 3], grey, atol=1e-3)
        np.testing.assert_allclose(luma @ (matrix[:, :3] @ colour), luma @ colour, atol=0.05)
        changed |= not np.allclose(matrix[:, :3] @ colour, colour, atol=1)
    assert changed


def test_grayscale_gives_equal_channels_and_blur_smooths():
    array = np.asarray(smooth_image(64, 64, 7))
    grey = denormalize(TrainViews(image_size=32, **{**PLAIN, "grayscale_p": 1.0}).view(array, (0, 0, 64, 64)))
    np.testing.assert_allclose(grey[..., 0], grey[..., 1], atol=1e-3)
    np.testing.assert_allclose(grey[..., 1], grey[..., 2], atol=1e-3)
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    plain = TrainViews(image_size=64, **PLAIN).view(noisy, (0, 0, 64, 64))
    blurred = TrainViews(image_size=64, **{**PLAIN, "blur_p": 1.0, "blur_sigma": (1.5, 2.0)}).view(
        noisy, (0, 0, 64, 64))
    assert blurred.std() < 0.6 * plain.std()


@pytest.mark.parametrize("fmt", ["JPEG", "MPO"])  # many phone JPEGs open as MPO
def test_exif_orientation_is_applied(fmt: str):
    upright = smooth_image(90, 60, 8)
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = {"save_all": True, "append_images": [stored]} if fmt == "MPO" else {}
    rotated = lazy(stored, fmt, exif=exif.tobytes(), **frames)
    assert rotated.format == fmt
    assert oriented_size(rotated) == (90, 60)
    a = CenterView(32)(rotated)
    b = CenterView(32)(lazy(upright))
    wrong = CenterView(32)(lazy(stored))
    assert (a - b).abs().mean() < 0.1 < (wrong - b).abs().mean()


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK"])
def test_other_modes_become_rgb(mode):
    """A whole-image view at the image's own size, no augmentation: exactly PIL's RGB conversion."""
    image = smooth_image(40, 40, 9).convert(mode)
    if mode in ("LA", "RGBA"):  # a varying alpha, which the conversion drops
        image.putalpha(Image.linear_gradient("L").resize(image.size))
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    expected = np.asarray(lazy(image, fmt).convert("RGB"), np.float32)
    views = TrainViews(image_size=40, num_views=1, scale=(1.0, 1.0), ratio=(1.0, 1.0), **PLAIN)
    (x,) = views(lazy(image, fmt))
    assert x.shape == (3, 40, 40)
    assert np.abs(denormalize(x) - expected).max() < 1e-3


def test_center_view_crops_the_middle():
    stripes = np.zeros((40, 120, 3), np.uint8)
    stripes[:, :40, 0] = 255
    stripes[:, 40:80, 1] = 255
    stripes[:, 80:, 2] = 255
    x = denormalize(CenterView(16)(lazy(Image.fromarray(stripes), "PNG")))
    assert (x[..., 1] > 250).all() and (x[..., [0, 2]] < 5).all()


def test_extreme_aspect_ratio_falls_back_inside_the_image():
    views = TrainViews(image_size=16)
    for _ in range(20):
        left, top, right, bottom = views.sample_box(1000, 10)
        assert 0 <= left < right <= 1000 and 0 <= top < bottom <= 10
    out = views(lazy(smooth_image(1000, 10, 10), "PNG"))
    assert all(x.shape == (3, 16, 16) for x in out)


def test_invalid_parameters_are_refused():
    with pytest.raises(ValueError, match="scale"):
        TrainViews(scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="hue"):
        TrainViews(hue=0.7)
    with pytest.raises(ValueError, match="num_views"):
        TrainViews(num_views=0)
    cases = {
        "flip_p": (r"^flip_p must be a probability in \[0, 1\], got 2$", {"flip_p": 2}),
        "jitter_p": (r"^jitter_p must be a probability in \[0, 1\], got -1$", {"jitter_p": -1}),
        "grayscale_p": (r"^grayscale_p must be a probability", {"grayscale_p": 1.5}),
        "blur_p": (r"^blur_p must be a probability", {"blur_p": -0.1}),
        "contrast": (r"^contrast must be 0 or more, got -0.4$", {"contrast": -0.4}),
        "blur_sigma": (r"^blur_sigma must satisfy 0 < min <= max, got \(-1, -1\)$", {"blur_sigma": (-1, -1)}),
        "ratio": (r"^ratio must satisfy 0 < min <= max, got \(0, 1\)$", {"ratio": (0, 1)}),
    }
    for message, kwargs in cases.values():
        with pytest.raises(ValueError, match=message):
            TrainViews(**kwargs)
    TrainViews(flip_p=1, jitter_p=0, blur_sigma=(0.5, 0.5), ratio=(1, 1))  # the bounds themselves are fine


def test_uint8_output_normalises_to_the_float_output():
    image = smooth_image(80, 60, 11)
    as_float = CenterView(32)(lazy(image))
    as_uint8 = CenterView(32, normalize=False)(lazy(image))
    assert as_uint8.dtype == torch.uint8 and as_uint8.shape == (3, 32, 32)
    torch.testing.assert_close(normalize_uint8(as_uint8), as_float, atol=1e-5, rtol=0)


def test_uint8_batches_normalise_without_host_copies_and_bit_for_bit_as_float32_tensors():
    batch = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert count_host_syncs(lambda: normalize_uint8(batch)) == {}
    std = torch.tensor(STD, dtype=torch.float32).view(3, 1, 1)
    mean = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
    expected = batch.float() * (1.0 / (255.0 * std)) - mean / std
    assert torch.equal(normalize_uint8(batch), expected)


class FixedBox(TrainViews):
    """TrainViews whose crop box is `box` (in oriented full-size pixels), recording each decoded shape."""

    def __init__(self, box: tuple[int, int, int, int], **kw) -> None:
        super().__init__(**kw)
        self.box, self.shapes = box, []

    def sample_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        return self.box

    def view(self, array: np.ndarray, box: tuple[float, float, float, float]) -> torch.Tensor:
        self.shapes.append(array.shape)
        return super().view(array, box)


def test_draft_decoded_view_crops_the_same_region_as_a_full_decode() -> None:
    """The full-size crop box is scaled onto the draft-reduced array: same content as a full-size crop."""
    source = smooth_image(1600, 1200, 12)
    box = (900, 500, 1300, 900)
    views = FixedBox(box, image_size=64, num_views=1, **PLAIN)
    (x,) = views(lazy(source, quality=95))
    assert views.shapes == [(300, 400, 3)]  # a 400-pixel crop at 64 pixels: a 1/4 draft
    full = views.view(decode_rgb(lazy(source, quality=95)), box)
    elsewhere = views.view(decode_rgb(lazy(source, quality=95)), (0, 0, 400, 400))
    assert (x - full).abs().mean() < 0.05 < (elsewhere - full).abs().mean()


@pytest.mark.parametrize("order", [("brightness", "contrast", "saturation"),
                                   ("contrast", "saturation", "brightness"),
                                   ("saturation", "brightness", "contrast")])
def test_composed_jitter_equals_the_ops_applied_one_by_one(
    monkeypatch: pytest.MonkeyPatch, order: tuple[str, ...]
) -> None:
    """The one composed matrix equals brightness, contrast (about the grey mean of the image as it is at
    that point) and saturation applied in turn, in the drawn order, on unclamped float pixels."""
    factors = {"brightness": 1.3, "contrast": 0.6, "saturation": 1.4}
    draws = iter(factors[name] for name in order)

    class Drawn:
        """The module's `random`, with the op order and factors fixed."""

        @staticmethod
        def random() -> float:
            return 0.0

        @staticmethod
        def shuffle(ops: list[str]) -> None:
            assert sorted(ops) == sorted(order)
            ops[:] = order

        @staticmethod
        def uniform(low: float, high: float) -> float:
            factor = next(draws)
            assert low <= factor <= high
            return factor

    monkeypatch.setattr(augment, "random", Drawn)
    view = np.asarray(smooth_image(32, 32, 13))
    views = TrainViews(image_size=32, **{**PLAIN, "jitter_p": 1.0, "brightness": 0.5, "contrast": 0.5,
                                         "saturation": 0.5})
    matrix = views.colour_matrix(view).astype(np.float64)
    luma = np.array([0.299, 0.587, 0.114])
    pixels = view.reshape(-1, 3).astype(np.float64)
    expected = pixels
    for name in order:
        f = factors[name]
        if name == "brightness":
            expected = f * expected
        elif name == "contrast":
            expected = f * expected + (1 - f) * (expected @ luma).mean()
        else:
            expected = f * expected + (1 - f) * (expected @ luma)[:, None]
    np.testing.assert_allclose(pixels @ matrix[:, :3].T + matrix[:, 3], expected, atol=1e-2)


def test_crop_scale_above_the_whole_image_is_refused() -> None:
    """A crop cannot cover more than the image: a scale maximum above 1 is refused, naming the bound."""
    with pytest.raises(ValueError, match=r"^scale must satisfy 0 < min <= max <= 1, got \(0.5, 1.5\)$"):
        TrainViews(scale=(0.5, 1.5))
    TrainViews(scale=(0.5, 1.0))  # the bound itself is fine


@pytest.mark.parametrize(("orientation", "to_stored"), [(5, Image.Transpose.TRANSPOSE),
                                                        (6, Image.Transpose.ROTATE_90),
                                                        (7, Image.Transpose.TRANSVERSE),
                                                        (8, Image.Transpose.ROTATE_270)])
def test_exif_orientations_that_swap_axes(orientation: int, to_stored: Image.Transpose) -> None:
    """Orientations 5 to 8 store the image with width and height swapped: the oriented size, the center
    view and a training crop box placed in upright pixels all see the upright image."""
    upright = smooth_image(90, 60, 14)
    stored = upright.transpose(to_stored)
    exif = Image.Exif()
    exif[0x0112] = orientation
    rotated = lazy(stored, exif=exif.tobytes(), quality=95)
    assert oriented_size(rotated) == (90, 60)
    a = CenterView(32)(rotated)
    b = CenterView(32)(lazy(upright, quality=95))
    wrong = CenterView(32)(lazy(stored, quality=95))
    assert (a - b).abs().mean() < 0.1 < (wrong - b).abs().mean()
    left, right = (5, 10, 45, 50), (45, 10, 85, 50)  # off-centre boxes, in upright pixels
    (crop,) = FixedBox(left, image_size=32, num_views=1, **PLAIN)(
        lazy(stored, exif=exif.tobytes(), quality=95))
    (expected,) = FixedBox(left, image_size=32, num_views=1, **PLAIN)(lazy(upright, quality=95))
    (elsewhere,) = FixedBox(right, image_size=32, num_views=1, **PLAIN)(lazy(upright, quality=95))
    assert (crop - expected).abs().mean() < 0.1 < (elsewhere - expected).abs().mean()
