"""Raw WebDataset sample -> checked fields (lazy image, caption, metadata), with typed skip reasons.

Two sample layouts are read. This project's (written by `data_recipes`): `__key__`, an image, `txt` (the
caption) and `json` = `{"image_id", "text_id", "captions", "tags"}`; the samples of one image share its
`image_id`. Ids are unique within a data set, not across sets (COCO-CN, Flickr30K-CN and MUGE all number
their images from small integers), so the image id read is the shard's folder and the json's id: shards of
two sets mixed in one run (in two folders) never make two images one.
Plain caption sets (img2dataset's output for LAION, Wukong, Zero..., or any `jpg` + `txt` WebDataset): a
`json` without `image_id` (img2dataset's `url`, `key`, `status`, `caption`, `width`... fields, which are not
read), or no `json` at all. Such a sample is its own image: its image id is its shard's url and its
`__key__` (img2dataset's keys repeat across data sets, so the key alone could make two images of a mixed set
one), its captions are its caption alone, and it has no tags (it is left out of the tag loss, never given fake
tags).

Every way a sample can be unusable maps to one entry of `SKIP_REASONS`; the pipeline counts skips per
reason (see `ernievil2_train.data.batches`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import os
import re
from dataclasses import dataclass, field

from PIL import Image

SKIP_REASONS: tuple[str, ...] = (
    "bad_tar",  # unreadable or truncated tar, unopenable shard
    "short_shard",  # samples a shard's `{split}.json` index lists that its tar does not hold
    "missing_field",  # no image or no `txt` in the sample
    "bad_text",  # caption empty, not UTF-8, or with no token
    "bad_json",  # `json` present but not JSON, not an object, or with a field of the wrong type
    "bad_image",  # image undecodable or truncated
    "image_too_large",  # header says more pixels than `max_image_pixels` (decompression bomb guard)
    "other",  # anything unexpected (logged with its message)
)
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000


class SkipSample(Exception):
    """The sample cannot be used; `reason` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class RawSample:
    """Checked fields of one shard sample; `image` is opened (header read) but not decoded."""

    key: str
    image: Image.Image
    caption: str
    image_id: str
    captions: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)


def decode_base64(text: str) -> bytes:
    """Strict base64 to bytes (standard or Chinese-CLIP's URL-safe alphabet); raises ValueError."""
    text = text.strip().replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as err:
        raise ValueError("bad base64") from err


def is_remote(url: str) -> bool:
    """Whether `url` names a remote source (`scheme://...` or a `pipe:` command) rather than a local path."""
    return "://" in url or url.startswith("pipe:")


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, key: str = "") -> Image.Image:
    """Open image bytes lazily; refuse them when the header announces more than `max_pixels` pixels. A limit
    above PIL's own (`Image.MAX_IMAGE_PIXELS`, which PIL enforces while opening) raises PIL's to it."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exn:
        raise SkipSample("image_too_large", f"{key}: {exn}") from exn
    except Exception as exn:
        raise SkipSample("bad_image", f"{key}: {exn}") from exn
    width, height = image.size
    if width * height > max_pixels:
        raise SkipSample("image_too_large", f"{key}: {width}x{height} exceeds {max_pixels} pixels")
    return image


def _text(data: bytes, key: str) -> str:
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as exn:
        raise SkipSample("bad_text", f"{key}: caption is not UTF-8") from exn
    if not text:
        raise SkipSample("bad_text", f"{key}: empty caption")
    return text


def _strings(meta: dict, name: str, key: str) -> list[str]:
    values = meta.get(name)
    values = [] if values is None else values  # absent or null: none
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise SkipSample("bad_json", f"{key}: json field {name!r} must be a list of strings")
    return [v.strip() for v in values if v.strip()]


def _meta(data: bytes | None, key: str) -> dict:
    """The sample's metadata as an object; `{}` without a `json`."""
    if data is None:
        return {}
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exn:
        raise SkipSample("bad_json", f"{key}: json is not valid: {exn}") from exn
    if not isinstance(meta, dict):
        raise SkipSample("bad_json", f"{key}: json must be an object, got {type(meta).__name__}")
    return meta


def _image_id(meta: dict, key: str) -> str | None:
    """The json's `image_id` (a string or an integer); None when the json has none (a plain caption set)."""
    if "image_id" not in meta:
        return None
    image_id = meta["image_id"]
    if isinstance(image_id, bool) or not isinstance(image_id, str | int) or not str(image_id).strip():
        raise SkipSample("bad_json", f"{key}: json field 'image_id' must be a non-empty string or an integer")
    return str(image_id)


def parse_sample(sample: dict, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> RawSample:
    """Check a raw sample (`__key__`, image, `txt`, optional `json`) and open its image header.

    With an `image_id` in its json, the sample is one caption of that image (`captions`, `tags` from the
    json); without one, or without a json, it is its own image (`own_image_id`, its caption, no tags).
    """
    key = str(sample.get("__key__", "?"))
    image_data = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    missing = [name for name, value in (("image", image_data), ("txt", sample.get("txt"))) if value is None]
    if missing:
        raise SkipSample("missing_field", f"{key}: no {', '.join(missing)}")
    caption = _text(sample["txt"], key)
    meta = _meta(sample.get("json"), key)
    image_id = _image_id(meta, key)
    url = str(sample.get("__url__", ""))
    if image_id is None:
        image_id = own_image_id(url, key)
        captions, tags = [caption], []
    else:
        image_id = data_set_image_id(url, image_id)
        captions, tags = _strings(meta, "captions", key), _strings(meta, "tags", key)
    image = open_image(image_data, max_pixels, key)
    return RawSample(key=key, image=image, caption=caption, image_id=image_id, captions=captions, tags=tags)


_SHARD_NUMBER = re.compile(r"[-_]?\d+$")  # what ends a shard's name: train-000003, 00003


def data_set_image_id(url: str, image_id: str) -> str:
    """The id of image `image_id` of the data set whose shard is `url`: the data set and the id."""
    return f"{data_set(url)}#{image_id}" if url else image_id


@functools.lru_cache(maxsize=4096)
def data_set(url: str) -> str:
    """The data set of shard `url`: its folder and its name less the shard number (`d/train-000003.tar` ->
    `d/train`; `d/train.v2-000003.tar` -> `d/train.v2`; `d/00003.tar` -> `d/`), as recipes write each split's
    shards into a folder under its name."""
    name = url.rpartition("/")[2]
    stem = name.removesuffix(".tar") if name.endswith(".tar") else name.split(".")[0]
    return f"{shard_folder(url)}/{_SHARD_NUMBER.sub('', stem)}"


@functools.lru_cache(maxsize=4096)
def shard_folder(url: str) -> str:
    """The folder of shard `url`: resolved for a local path (`d/./x.tar` and `d/x.tar` are one data set), as
    written for a remote one."""
    if is_remote(url):
        return url.rpartition("/")[0]
    return os.path.dirname(os.path.realpath(url))


def own_image_id(url: str, key: str) -> str:
    """The image id of a sample that is its own image: its shard's url and its key."""
    return f"{url}#{key}" if url else key
