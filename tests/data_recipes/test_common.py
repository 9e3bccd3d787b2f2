"""What the recipes share: image preparation (kept, re-encoded, oriented, scaled, refused) and base64."""

from __future__ import annotations

import base64
import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_recipes.common import (
    JPEG_MAX_SIDE,
    TOO_LARGE,
    BadImage,
    ImageJob,
    decode_base64,
    prepare_image,
    prepare_job,
)
from data_recipes.shards import Skip
from tests.data_recipes.helpers import image_bytes

RED = image_bytes((250, 0, 0))


def test_prepare_image_keeps_or_reencodes():
    assert prepare_image(RED) == ("jpg", RED)
    png = image_bytes((1, 2, 3), fmt="PNG")
    assert prepare_image(png) == ("png", png)
    for fmt, mode in (("BMP", "RGB"), ("GIF", "P"), ("TIFF", "RGBA")):
        out = io.BytesIO()
        Image.new(mode, (10, 12)).save(out, format=fmt)
        ext, data = prepare_image(out.getvalue())
        img = Image.open(io.BytesIO(data))
        assert ext == "jpg" and img.format == "JPEG" and img.mode == "RGB" and img.size == (10, 12)
    ext, data = prepare_image(image_bytes((9, 9, 9), size=(100, 50)), max_size=50)
    assert Image.open(io.BytesIO(data)).size == (50, 25)
    with pytest.raises(BadImage, match="undecodable image"):
        prepare_image(RED[: len(RED) // 2])
    with pytest.raises(BadImage, match="undecodable image"):
        prepare_image(b"")


def test_an_image_longer_than_jpeg_allows_is_scaled_down_to_fit():
    """A 70 000 x 20 BMP (under the pixel limit) stopped the whole recipe: JPEG sides end at 65 500."""
    out = io.BytesIO()
    Image.new("RGB", (70_000, 20), (200, 10, 10)).save(out, format="BMP")
    ext, data = prepare_image(out.getvalue())
    img = Image.open(io.BytesIO(data))
    assert ext == "jpg" and img.size == (JPEG_MAX_SIDE, 19)
    ext, data = prepare_image(out.getvalue(), max_size=100_000)
    assert Image.open(io.BytesIO(data)).size == (JPEG_MAX_SIDE, 19)


def test_decode_base64_accepts_both_alphabets():
    data = bytes(range(256))
    assert decode_base64(base64.b64encode(data).decode()) == data
    assert decode_base64(base64.urlsafe_b64encode(data).decode() + "\n") == data
    with pytest.raises(BadImage, match="bad base64"):
        decode_base64("not base64!")


def test_mpo_jpeg_bytes_are_kept():
    out = io.BytesIO()
    frames = [Image.new("RGB", (20, 10), (200, 10, 10)), Image.new("RGB", (20, 10), (10, 10, 200))]
    frames[0].save(out, format="MPO", save_all=True, append_images=frames[1:])
    mpo = out.getvalue()
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    assert prepare_image(mpo) == ("jpg", mpo)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "TIFF"])  # Pillow turns a TIFF on load: never turn it twice
def test_reencoding_applies_the_exif_orientation(fmt):
    pixels = Image.new("RGB", (40, 20), (250, 0, 0))
    pixels.paste((0, 0, 250), (0, 0, 10, 20))  # blue on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the stored left edge becomes the top
    out = io.BytesIO()
    pixels.save(out, format=fmt, exif=exif)
    ext, data = prepare_image(out.getvalue(), max_size=20)
    img = Image.open(io.BytesIO(data))
    assert ext == "jpg" and img.size == (10, 20) and img.getexif().get(0x0112, 1) == 1
    top, bottom = img.getpixel((5, 1)), img.getpixel((5, 18))
    assert top[2] > 200 > top[0] and bottom[0] > 200 > bottom[2]


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` x `height` pixels (its pixel data is that of a 1x1 image)."""
    out = io.BytesIO()
    Image.new("L", (1, 1)).save(out, format="PNG")
    data = bytearray(out.getvalue())
    struct.pack_into(">II", data, 16, width, height)  # the IHDR chunk's data follows its length and type
    struct.pack_into(">I", data, 29, zlib.crc32(data[12:29]))
    return bytes(data)


def test_images_over_the_trainers_pixel_limit_are_skipped_undecoded():
    assert TOO_LARGE.startswith("image too large (over 64000000 pixels")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for size in ((8000, 8001), (9000, 9000), (10000, 10000), (14000, 14000)):
            with pytest.raises(BadImage) as err:
                prepare_image(_png_declaring(*size), max_size=100)
            assert str(err.value) == TOO_LARGE
        with pytest.raises(BadImage, match="undecodable image"):  # at the limit: decoded, and found truncated
            prepare_image(_png_declaring(8000, 8000))
    assert not caught


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_images_are_scaled_to_8_bit_jpeg(fmt):
    ramp = np.tile(np.arange(0, 65536, 257, dtype=np.uint16), (8, 1))  # 0..65535 in 256 steps
    out = io.BytesIO()
    Image.fromarray(ramp).save(out, format=fmt)
    assert Image.open(out).mode.startswith("I")
    ext, data = prepare_image(out.getvalue())
    img = Image.open(io.BytesIO(data))
    assert ext == "jpg" and img.format == "JPEG" and img.mode == "RGB" and img.size == (256, 8)
    assert abs(np.asarray(img, dtype=np.float64).mean() - 127.5) < 1


def test_an_image_path_that_is_no_regular_file_is_skipped_without_reading_it(tmp_path):
    """A pipe would be waited on for ever and a device read without end: both are unreadable files."""
    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)
    for source in (pipe, Path("/dev/zero"), tmp_path):
        job = ImageJob("img", str(source), True, (("t1", "一只猫"), ("t2", "一只白猫")))
        assert prepare_job(job) == Skip("unreadable file", example=str(source), captions=2)
