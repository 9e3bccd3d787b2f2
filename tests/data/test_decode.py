"""Raw shard samples -> checked fields: every unusable sample raises `SkipSample` with its reason and a
one-line message naming the sample and the field; image ids are per data set folder."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from ernievil2_train.data.decode import (
    SKIP_REASONS,
    SkipSample,
    data_set_image_id,
    decode_base64,
    is_remote,
    open_image,
    own_image_id,
    parse_sample,
)
from tests.data.shard_helpers import caption_of, img2dataset_sample, sample, smooth_image


def _without(item: dict, *names: str) -> dict:
    return {k: v for k, v in item.items() if k not in names}


def png_header(width: int, height: int) -> bytes:
    """A PNG holding a valid header announcing `width` x `height` RGB pixels and no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"")


def image_bytes(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def skip_of(item: dict, max_pixels: int | None = None) -> SkipSample:
    """The `SkipSample` that parsing `item` raises."""
    with pytest.raises(SkipSample) as caught:
        parse_sample(item) if max_pixels is None else parse_sample(item, max_pixels)
    return caught.value


def meta(**fields: object) -> bytes:
    return json.dumps(fields, ensure_ascii=False).encode("utf-8")


def test_a_skip_carries_its_reason_and_refuses_an_unknown_one() -> None:
    skip = SkipSample("bad_text", "s00001: empty caption")
    assert (skip.reason, str(skip)) == ("bad_text", "bad_text: s00001: empty caption")
    assert set(SKIP_REASONS) >= {"bad_tar", "short_shard", "missing_field", "bad_json", "other"}
    with pytest.raises(ValueError, match=r"^unknown skip reason 'bad_caption'$"):
        SkipSample("bad_caption", "s00001: empty caption")


def test_base64_in_either_alphabet_decodes_to_the_same_bytes() -> None:
    """Chinese-CLIP's TSVs use the URL-safe alphabet; surrounding whitespace (a line end) is ignored."""
    data = bytes(range(256)) * 3
    standard = base64.b64encode(data).decode()
    assert "+" in standard and "/" in standard
    assert decode_base64(standard) == data
    assert decode_base64(f"  {base64.urlsafe_b64encode(data).decode()}\r\n") == data


@pytest.mark.parametrize("text", ["not base64!", "QUJD*RA==", "QUJDRA=", "图片QUJD", "QUJD RA=="])
def test_anything_but_strict_base64_is_a_value_error(text: str) -> None:
    """Stray characters are refused, not dropped (dropping them would decode a different image)."""
    with pytest.raises(ValueError, match=r"^bad base64$"):
        decode_base64(text)


@pytest.mark.parametrize(
    ("url", "remote"),
    [
        ("http://host/set/train-000000.tar", True),
        ("https://host/train.json", True),
        ("s3://bucket/set/00000.tar", True),
        ("pipe:aws s3 cp s3://bucket/00000.tar -", True),
        ("pipe:cat train-000000.tar", True),
        ("/data/set/train-000000.tar", False),
        ("set/./train-000000.tar", False),
        ("~/data/train-{000000..000003}.tar", False),
        ("pipeline/train-000000.tar", False),
    ],
)
def test_remote_sources_are_told_from_local_paths(url: str, remote: bool) -> None:
    assert is_remote(url) is remote


def test_an_image_is_opened_without_being_decoded() -> None:
    """Only the header is read: a truncated PNG opens with its size, and fails only once it is decoded."""
    whole = image_bytes(smooth_image(96, 72, 1), "PNG")
    image = open_image(whole[: len(whole) // 2], key="s00001")
    assert image.size == (96, 72)
    with pytest.raises(OSError, match="truncated"):
        image.load()


def test_the_pixel_limit_is_inclusive_and_the_message_names_the_sample() -> None:
    assert open_image(png_header(96, 72), max_pixels=96 * 72).size == (96, 72)
    with pytest.raises(SkipSample) as caught:
        open_image(png_header(96, 72), max_pixels=96 * 72 - 1, key="s00001")
    assert caught.value.reason == "image_too_large"
    assert str(caught.value) == f"image_too_large: s00001: 96x72 exceeds {96 * 72 - 1} pixels"


def test_a_limit_above_pils_own_is_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """PIL refuses headers of more than twice its `MAX_IMAGE_PIXELS` while opening: a larger configured limit
    raises PIL's, so that images up to it open."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 1000
    assert open_image(png_header(side, side), max_pixels=side * side).size == (side, side)
    with pytest.raises(SkipSample, match=f"exceeds {side * side - 1} pixels"):
        open_image(png_header(side, side), max_pixels=side * side - 1)


def test_a_header_past_pils_own_bomb_limit_is_too_large_not_bad() -> None:
    """PIL refuses such a header itself, before the size can be checked: still an `image_too_large`."""
    with pytest.raises(SkipSample) as caught:
        open_image(png_header(100_000, 100_000), key="s00002")
    assert caught.value.reason == "image_too_large"
    assert str(caught.value).startswith("image_too_large: s00002: ")


@pytest.mark.parametrize("data", [b"", b"\x00not an image at all" * 20, png_header(96, 72)[:20]])
def test_bytes_that_are_no_image_are_a_bad_image_naming_the_sample(data: bytes) -> None:
    with pytest.raises(SkipSample) as caught:
        open_image(data, key="s00003")
    assert caught.value.reason == "bad_image"
    assert str(caught.value).startswith("bad_image: s00003: ") and "\n" not in str(caught.value)


def test_a_recipe_sample_is_one_caption_of_its_image(tmp_path: Path) -> None:
    """The json gives the image id (qualified by the shard's folder), all its captions and its tags."""
    shard = tmp_path / "set" / "train-000000.tar"
    raw = parse_sample({**sample(3, captions=["一只狗", "两个人"]), "__url__": str(shard)})
    assert (raw.key, raw.caption, raw.captions, raw.tags) == ("s00003", "一只狗", ["一只狗", "两个人"],
                                                              ["狗", "草地"])
    assert raw.image_id == f"{os.path.realpath(tmp_path / 'set')}/train#img3"
    assert raw.image.size == (96, 72)
    assert parse_sample(sample(3)).image_id == "img3"  # no url: the json's id as it is


def test_captions_and_tags_are_stripped_and_blank_ones_dropped() -> None:
    item = {**sample(4), "txt": " 一只狗\n".encode(),
            "json": meta(image_id=0, captions=[" 一只狗 ", "", "两个人\t"], tags=["  ", " 狗"])}
    raw = parse_sample(item)
    assert (raw.caption, raw.captions, raw.tags) == ("一只狗", ["一只狗", "两个人"], ["狗"])
    assert raw.image_id == "0"
    bare = parse_sample({**sample(4), "json": meta(image_id="img4", captions=None)})
    assert (bare.captions, bare.tags) == ([], [])


@pytest.mark.parametrize("ext", ["png", "jpeg", "webp"])
def test_every_image_extension_is_read(ext: str) -> None:
    fmt = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[ext]
    item = {**_without(sample(5), "jpg"), ext: image_bytes(smooth_image(40, 30, 5), fmt)}
    assert parse_sample(item).image.size == (40, 30)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"txt": None}, "missing_field: s00006: no txt"),
        ({"jpg": None}, "missing_field: s00006: no image"),
        ({"jpg": None, "txt": None}, "missing_field: s00006: no image, txt"),
        ({"__key__": None, "txt": None}, "missing_field: ?: no txt"),
        ({"txt": b" \n\t"}, "bad_text: s00006: empty caption"),
        ({"txt": b"\xff\xfe caption"}, "bad_text: s00006: caption is not UTF-8"),
        ({"json": b'["img6"]'}, "bad_json: s00006: json must be an object, got list"),
        ({"json": meta(image_id="img6", tags="狗")},
         "bad_json: s00006: json field 'tags' must be a list of strings"),
        ({"json": meta(image_id="img6", captions=["一只狗", 7])},
         "bad_json: s00006: json field 'captions' must be a list of strings"),
        ({"json": meta(image_id=6.0)},
         "bad_json: s00006: json field 'image_id' must be a non-empty string or an integer"),
        ({"json": meta(image_id=" ")},
         "bad_json: s00006: json field 'image_id' must be a non-empty string or an integer"),
        ({"json": meta(image_id="img6", tags=0)},
         "bad_json: s00006: json field 'tags' must be a list of strings"),
        ({"json": meta(image_id="img6", captions="")},
         "bad_json: s00006: json field 'captions' must be a list of strings"),
        ({"json": meta(image_id="img6", tags={})},
         "bad_json: s00006: json field 'tags' must be a list of strings"),
        ({"jpg": b"\x00not a jpeg"}, "bad_image: s00006: "),
    ],
)
def test_each_broken_field_gives_its_reason_and_names_sample_and_field(change: dict, message: str) -> None:
    item = {**_without(sample(6), *change), **{k: v for k, v in change.items() if v is not None}}
    skip = skip_of(item)
    assert str(skip).startswith(message) and "\n" not in str(skip)
    assert skip.reason == message.split(":")[0]
    if not message.endswith(": "):
        assert str(skip) == message


@pytest.mark.parametrize("data", [b"{not json", b"\xc3\x28{}", b""])
def test_json_that_does_not_parse_is_bad_json(data: bytes) -> None:
    skip = skip_of({**sample(7), "json": data})
    assert skip.reason == "bad_json"
    assert str(skip).startswith("bad_json: s00007: json is not valid: ") and "\n" not in str(skip)


def test_a_caption_problem_is_found_before_the_image_is_opened() -> None:
    """A sample counts once, under its first problem: the text and json are checked before the image."""
    assert skip_of({**sample(8), "txt": b"", "jpg": b"not a jpeg"}).reason == "bad_text"
    assert skip_of({**sample(8), "json": b"[]", "jpg": b"not a jpeg"}).reason == "bad_json"


def test_the_pixel_limit_reaches_the_image_check() -> None:
    assert skip_of(sample(9), max_pixels=96 * 72 - 1).reason == "image_too_large"
    assert parse_sample(sample(9), 96 * 72).image.size == (96, 72)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"json": b"{'url': 'not json'}"}, "bad_json"),
        ({"json": b'["a list", "not an object"]'}, "bad_json"),
        ({"json": b'"just a string"'}, "bad_json"),
        ({"json": json.dumps({"key": "000000001", "image_id": True}).encode()}, "bad_json"),
        ({"json": json.dumps({"key": "000000001", "image_id": {"id": 1}}).encode()}, "bad_json"),
        ({"txt": None}, "missing_field"),
        ({"jpg": None}, "missing_field"),
    ],
)
def test_broken_caption_set_samples_are_skipped_with_their_reason(change: dict, reason: str) -> None:
    item = img2dataset_sample(1)
    item = {**_without(item, *change), **{k: v for k, v in change.items() if v is not None}}
    with pytest.raises(SkipSample) as caught:
        parse_sample(item)
    assert caught.value.reason == reason


def test_a_caption_set_sample_parses_to_its_own_image() -> None:
    for item in (img2dataset_sample(2), _without(img2dataset_sample(2), "json")):
        raw = parse_sample(item)
        assert (raw.image_id, raw.caption, raw.captions, raw.tags) == ("000000002", caption_of(2),
                                                                      [caption_of(2)], [])
    with_id = {**img2dataset_sample(2), "json": json.dumps({"image_id": 7, "tags": ["狗"]}).encode()}
    assert (parse_sample(with_id).image_id, parse_sample(with_id).tags) == ("7", ["狗"])


def test_a_caption_set_sample_is_named_by_its_shard_and_key(tmp_path: Path) -> None:
    """img2dataset's keys restart at 0 in every set: the shard's url keeps two sets' samples apart."""
    laion, wukong = str(tmp_path / "laion" / "00000.tar"), str(tmp_path / "wukong" / "00000.tar")
    ids = [parse_sample({**img2dataset_sample(2), "__url__": url}).image_id for url in (laion, wukong)]
    assert ids == [f"{laion}#000000002", f"{wukong}#000000002"]
    assert (own_image_id(laion, "k"), own_image_id("", "k")) == (f"{laion}#k", "k")


def test_an_image_id_belongs_to_the_folder_and_split_of_its_shard(tmp_path: Path) -> None:
    """Shards of one split in one folder share their images, however the path is written (`./`, a link to
    the folder); the same id in another folder, or of another split written into the same folder, is
    another image. Remote shards are grouped by their url's folder and name."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    folder = os.path.realpath(tmp_path / "a")
    for url in ("a/train-000000.tar", "a/train-000001.tar", "a/./train-000000.tar", "link/train-000002.tar"):
        assert data_set_image_id(str(tmp_path / url), "7") == f"{folder}/train#7"
    assert data_set_image_id(str(tmp_path / "a" / "extra-000000.tar"), "7") == f"{folder}/extra#7"
    for split in ("train.v1", "train.v2"):  # a dot in a split's name
        assert data_set_image_id(str(tmp_path / "a" / f"{split}-000000.tar"), "7") == f"{folder}/{split}#7"
    other = os.path.realpath(tmp_path / "b")
    assert data_set_image_id(str(tmp_path / "b" / "train-000000.tar"), "7") == f"{other}/train#7"
    for name in ("00000.tar", "00012.tar.gz"):  # numbered shards only (img2dataset's)
        assert data_set_image_id(str(tmp_path / "b" / name), "7") == f"{other}/#7"
    assert data_set_image_id("https://host/set/train-000001.tar", "7") == "https://host/set/train#7"
    assert data_set_image_id("https://host/other/train-000001.tar", "7") == "https://host/other/train#7"
    assert data_set_image_id("", "7") == "7"
