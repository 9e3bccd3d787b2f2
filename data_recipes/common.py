"""Helpers the recipes share: image checking/encoding, base64, tags, and grouping caption rows by image."""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from data_recipes.shards import ImageRecord, Skip, SkipCounter

_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


class BadImage(ValueError):
    """An image that cannot be used; the message is the skip reason."""


def decode_base64(text: str) -> bytes:
    """Strict base64 to bytes (standard or Chinese-CLIP's URL-safe alphabet); raises `BadImage`."""
    text = text.strip().replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as err:
        raise BadImage("bad base64") from err


def encode_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def prepare_image(data: bytes, max_size: int | None = None, quality: int = 95) -> tuple[str, bytes]:
    """Check that `data` decodes; return `(ext, bytes)`.

    JPEG/PNG/WebP within `max_size` keep their original bytes; anything else (other formats, or images whose
    longer side exceeds `max_size`) is re-encoded as RGB JPEG, resized so the longer side is `max_size`.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.load()
            too_big = max_size is not None and max(img.size) > max_size
            if fmt in _FORMAT_EXT and not too_big:
                return _FORMAT_EXT[fmt], data
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImage("undecodable image") from err
    if too_big:
        scale = max_size / max(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BICUBIC)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return "jpg", out.getvalue()


def split_tags(text: str) -> list[str]:
    """Tags from a string separated by "," or "，": stripped, without empty ones or repeats."""
    return unique(t.strip() for t in text.replace("，", ",").split(","))


def unique(items: Iterable[str]) -> list[str]:
    """Non-empty items in first-seen order without repeats."""
    return list(dict.fromkeys(t for t in items if t))


@dataclass(frozen=True)
class ImageJob:
    """Work for one image: where its bytes are (base64 text or a file path) and what to write with it."""

    image_id: str
    source: str
    is_path: bool
    captions: tuple[tuple[str, str], ...]
    tags: tuple[str, ...] = ()


def prepare_job(job: ImageJob, max_size: int | None = None) -> ImageRecord | Skip:
    """Load, check and (when needed) re-encode a job's image; a `Skip` with the reason when it fails."""
    try:
        if job.is_path:
            try:
                data = Path(job.source).read_bytes()
            except OSError:
                return Skip("missing file")
        else:
            data = decode_base64(job.source)
        ext, data = prepare_image(data, max_size)
    except BadImage as err:
        return Skip(str(err))
    return ImageRecord(job.image_id, ext, data, list(job.captions), list(job.tags))


@dataclass
class Row:
    """One caption row of a flat input: row index, image id, image source, caption, tags."""

    index: int
    image_id: str
    source: str
    is_path: bool
    caption: str
    tags: list[str]


@dataclass
class _Group:
    first: int
    captions: list[tuple[str, str]]
    tags: list[str]


def group_rows(
    read_rows: Callable[[], Iterator[Row | Skip]], skips: SkipCounter
) -> tuple[int, Iterator[ImageJob]]:
    """Group caption rows by image in two passes over the input, so image data is never held in memory.

    The first pass counts skips and collects, per image id, all captions (`text_id` = row index) and the union
    of the tags; the second yields one `ImageJob` per image, at its first row. Returns (images, jobs).
    """
    groups: dict[str, _Group] = {}
    for row in read_rows():
        if isinstance(row, Skip):
            skips.add(row.reason, row.count)
            continue
        group = groups.setdefault(row.image_id, _Group(row.index, [], []))
        group.captions.append((str(row.index), row.caption))
        group.tags = unique([*group.tags, *row.tags])

    def jobs() -> Iterator[ImageJob]:
        for row in read_rows():
            if isinstance(row, Row) and groups[row.image_id].first == row.index:
                group = groups[row.image_id]
                yield ImageJob(
                    row.image_id, row.source, row.is_path, tuple(group.captions), tuple(group.tags)
                )

    return len(groups), jobs()
