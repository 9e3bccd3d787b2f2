"""Raw WebDataset sample -> checked fields (lazy image, caption, metadata), with typed skip reasons.

Every way a sample can be unusable maps to one entry of `SKIP_REASONS`; the pipeline counts skips per
reason (see `ernievil2_train.data.datamodule`).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

from PIL import Image

SKIP_REASONS: tuple[str, ...] = (
    "bad_tar",  # unreadable or truncated tar, unopenable shard
    "short_shard",  # samples a shard's `{split}.json` index lists that its tar does not hold
    "missing_field",  # no image, `txt` or `json` in the sample
    "bad_text",  # caption empty or not UTF-8
    "bad_json",  # metadata not JSON, not an object, no `image_id`, wrong field types
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


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, key: str = "") -> Image.Image:
    """Open image bytes lazily; refuse them when the header announces more than `max_pixels` pixels."""
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
    values = meta.get(name) or []
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise SkipSample("bad_json", f"{key}: json field {name!r} must be a list of strings")
    return [v.strip() for v in values if v.strip()]


def _meta(data: bytes, key: str) -> dict:
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exn:
        raise SkipSample("bad_json", f"{key}: json is not valid: {exn}") from exn
    if not isinstance(meta, dict) or not isinstance(meta.get("image_id"), str | int):
        raise SkipSample("bad_json", f"{key}: json needs an object with an 'image_id'")
    return meta


def parse_sample(sample: dict, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> RawSample:
    """Check a raw sample (`__key__`, image, `txt`, `json`) and open its image header."""
    key = str(sample.get("__key__", "?"))
    image_data = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    missing = [name for name, value in (("image", image_data), ("txt", sample.get("txt")),
                                         ("json", sample.get("json"))) if value is None]
    if missing:
        raise SkipSample("missing_field", f"{key}: no {', '.join(missing)}")
    caption = _text(sample["txt"], key)
    meta = _meta(sample["json"], key)
    image = open_image(image_data, max_pixels, key)
    return RawSample(
        key=key,
        image=image,
        caption=caption,
        image_id=str(meta["image_id"]),
        captions=_strings(meta, "captions", key),
        tags=_strings(meta, "tags", key),
    )
