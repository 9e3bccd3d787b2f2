"""Helpers the recipes share: image checking/encoding, base64, tag splitting and the eval-set writer."""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, UnidentifiedImageError

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


def write_evalset(
    out_dir: Path,
    split: str,
    images: Iterable[tuple[str, bytes]],
    texts: Iterable[tuple[str, str, list[str]]],
) -> tuple[int, int]:
    """Write the Chinese-CLIP layout `{split}_imgs.tsv` + `{split}_texts.jsonl`; returns (images, texts).

    Both files are written under temporary names and renamed at the end.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    img_path = out_dir / f"{split}_imgs.tsv"
    txt_path = out_dir / f"{split}_texts.jsonl"
    n_img = n_txt = 0
    with open(img_path.with_name(img_path.name + ".tmp"), "w", encoding="utf-8") as f:
        for image_id, data in images:
            f.write(f"{image_id}\t{encode_base64(data)}\n")
            n_img += 1
    with open(txt_path.with_name(txt_path.name + ".tmp"), "w", encoding="utf-8") as f:
        for text_id, text, image_ids in texts:
            f.write(
                json.dumps({"text_id": text_id, "text": text, "image_ids": image_ids}, ensure_ascii=False)
                + "\n"
            )
            n_txt += 1
    os.replace(img_path.with_name(img_path.name + ".tmp"), img_path)
    os.replace(txt_path.with_name(txt_path.name + ".tmp"), txt_path)
    return n_img, n_txt
