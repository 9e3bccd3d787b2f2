"""Helpers the recipes share: reading text lines, checking captions and images, encoding images, base64, tags,
and grouping caption rows by image."""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import unicodedata
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from data_recipes.shards import ImageRecord, RecipeError, RecipeSkips, Skip
from ernievil2_train.data.decode import DEFAULT_MAX_IMAGE_PIXELS  # PIL only: the recipes never import torch
from ernievil2_train.data.decode import decode_base64 as _strict_base64
from ernievil2_train.imaging import to_rgb

# MPO (the multi-picture JPEG of many cameras and phones) starts with a plain baseline JPEG that every JPEG
# decoder reads, so its bytes are kept as a `jpg` like any other JPEG.
_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
_NOT_TEXT = frozenset({"Zs", "Cc", "Cf", "Cn", "Co", "Cs", "Mn"})  # Unicode categories the tokenizer drops
TOO_LARGE = (
    f"image too large (over {DEFAULT_MAX_IMAGE_PIXELS} pixels, which training skips; "
    "not decoded, so --max-size does not help)"
)


class BadImage(ValueError):
    """An image that cannot be used; the message is the skip reason."""


def read_lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """`(0-based line number, line without its line end)` for each non-blank line of a UTF-8 text file (a
    leading BOM is dropped; blank lines are passed over); the line is None when it is not valid UTF-8, so
    readers can skip and count it. A UTF-16 or UTF-32 file (its BOM, or a first line that is not blank and a
    quarter or more NUL bytes) is a `RecipeError` naming it; a stray NUL is the line's reader's to judge."""
    with path.open("rb") as fh:
        blank = True  # so far
        for index, raw in enumerate(fh):
            bom = index == 0 and raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
            wide = blank and raw.count(b"\0") * 4 >= len(raw.strip()) > 0  # ASCII in UTF-16: every other byte
            if bom or wide:
                raise RecipeError(f"{path}: not UTF-8 text (UTF-16?)")
            blank = blank and not raw.strip()
            try:
                line = raw.decode("utf-8-sig" if index == 0 else "utf-8")
            except UnicodeDecodeError:
                yield index, None
                continue
            if line.strip():
                yield index, line.rstrip("\r\n")


def caption_problem(caption: str) -> str | None:
    """Why a stripped caption cannot be used: "empty caption", or "caption without text" when it holds
    nothing that the tokenizer keeps (only whitespace, control or format characters, combining marks, NUL or
    U+FFFD, which its text cleaning removes); None when it can be used."""
    if not caption:
        return "empty caption"
    if all(c == "\ufffd" or unicodedata.category(c) in _NOT_TEXT for c in caption):
        return "caption without text"
    return None


def line_skip(reason: str, index: int) -> Skip:
    """A skipped input line, with its 1-based line number as the example."""
    return Skip(reason, example=f"line {index + 1}")


def decode_base64(text: str) -> bytes:
    """`ernievil2_train.data.decode.decode_base64`, raising `BadImage("bad base64")` on bad input."""
    try:
        return _strict_base64(text)
    except ValueError as err:
        raise BadImage("bad base64") from err


JPEG_MAX_SIDE = 65_500  # the longest side libjpeg writes


def prepare_image(data: bytes, max_size: int | None = None, quality: int = 95) -> tuple[str, bytes]:
    """Check that `data` decodes; return `(ext, bytes)`.

    JPEG (MPO included)/PNG/WebP of at most 8 bits per channel within `max_size` keep their original bytes;
    anything else (other formats, 16-bit or float pixels, or images whose longer side exceeds `max_size`) is
    re-encoded as 8-bit RGB JPEG (high bit depths scaled, not clipped), resized so the longer side is at most
    `max_size` and JPEG's `JPEG_MAX_SIDE`. Re-encoding applies the EXIF orientation to the pixels, since the
    new file carries no EXIF. Images of more pixels than training takes are refused before they are decoded
    (`TOO_LARGE`).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below is lower
            img = Image.open(io.BytesIO(data))
        with img:
            if img.width * img.height > DEFAULT_MAX_IMAGE_PIXELS:
                raise BadImage(TOO_LARGE)
            fmt = img.format
            img.load()
            too_big = max_size is not None and max(img.size) > max_size
            wide = img.mode in ("I", "F") or img.mode.startswith("I;16")
            if fmt in _FORMAT_EXT and not too_big and not wide:
                return _FORMAT_EXT[fmt], data
            rgb = to_rgb(ImageOps.exif_transpose(img))
    except BadImage:
        raise
    except Image.DecompressionBombError as err:
        raise BadImage(TOO_LARGE) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadImage("undecodable image") from err
    longest = min(max_size or JPEG_MAX_SIDE, JPEG_MAX_SIDE)
    if max(rgb.size) > longest:
        scale = longest / max(rgb.size)
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
    """Load, check and (when needed) re-encode a job's image; a `Skip` with the reason (and the captions it
    loses) when it fails."""
    lost = len(job.captions)
    try:
        if job.is_path:
            try:
                if Path(job.source).exists() and not Path(job.source).is_file():
                    return Skip("unreadable file", example=job.source, captions=lost)  # folder, pipe, device
                data = Path(job.source).read_bytes()
            except FileNotFoundError:
                return Skip("missing file", example=job.source, captions=lost)
            except OSError:
                return Skip("unreadable file", example=job.source, captions=lost)
        else:
            data = decode_base64(job.source)
        ext, data = prepare_image(data, max_size)
    except BadImage as err:
        return Skip(str(err), example=job.image_id, captions=lost)
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
    source: bytes
    captions: list[tuple[str, str]]
    tags: list[str]


def _source_digest(row: Row) -> bytes:
    """A short digest of where a row's image is: its normalised path, or its base64 text in one alphabet."""
    if row.is_path:
        text = os.path.normpath(row.source)
    else:
        text = "".join(row.source.split()).replace("-", "+").replace("_", "/")
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def group_rows(
    read_rows: Callable[[], Iterator[Row | Skip]], skips: RecipeSkips, source: Path | str = "the input"
) -> tuple[int, Iterator[ImageJob]]:
    """Group caption rows by image in two passes over the input, so image data is never held in memory.

    The first pass counts skips and collects, per image id, all captions (`text_id` = row index) and the union
    of the tags; the second yields one `ImageJob` per image, at its first row. A row whose image id was first
    seen with another image (other base64 data or another path) is skipped as "conflicting image for id", so
    its caption is never paired with the wrong picture. An input `source` that changed between the passes
    (an image id or image the first did not see) is a `RecipeError`. Returns (images, jobs).
    """
    groups: dict[str, _Group] = {}
    for row in read_rows():
        if isinstance(row, Skip):
            skips.add(row.reason, row.count, row.example)
            continue
        digest = _source_digest(row)
        group = groups.setdefault(row.image_id, _Group(row.index, digest, [], []))
        if group.source != digest:
            skips.add("conflicting image for id", example=f"line {row.index + 1} ({row.image_id})")
            continue
        group.captions.append((str(row.index), row.caption))
        group.tags = unique([*group.tags, *row.tags])

    def jobs() -> Iterator[ImageJob]:
        for row in read_rows():
            if not isinstance(row, Row):
                continue
            group = groups.get(row.image_id)
            first = group is not None and group.first == row.index
            if group is None or (first and group.source != _source_digest(row)):
                raise RecipeError(f"{source}: changed while the recipe read it (line {row.index + 1}); run "
                                  "it again once the file is complete")
            if first:
                yield ImageJob(
                    row.image_id, row.source, row.is_path, tuple(group.captions), tuple(group.tags)
                )

    return len(groups), jobs()
