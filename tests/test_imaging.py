"""`to_rgb`: images beyond 8 bits per channel are scaled to 8 bits, not clipped to white."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ernievil2_train.imaging import to_rgb
from ernievil2_train.vision.augment import CenterView

RAMP16 = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)


def _reopened(image: Image.Image, fmt: str) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return Image.open(io.BytesIO(buffer.getvalue()))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_grayscale_is_scaled(fmt: str) -> None:
    image = _reopened(Image.fromarray(RAMP16), fmt)
    assert image.mode.startswith("I")
    rgb = np.asarray(to_rgb(image))
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3)
    np.testing.assert_allclose(rgb[..., 0], RAMP16 / 257.0, atol=0.5)
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_floats_in_zero_to_one_are_scaled_and_eight_bit_modes_convert_as_pil_does() -> None:
    floats = Image.fromarray(np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16))
    assert np.asarray(to_rgb(floats))[..., 0].max() == 255
    palette = Image.new("P", (4, 4), 3)
    assert np.array_equal(np.asarray(to_rgb(palette)), np.asarray(palette.convert("RGB")))
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 40))
    assert np.array_equal(np.asarray(to_rgb(rgba)), np.asarray(rgba.convert("RGB")))


def test_training_views_of_a_sixteen_bit_png_keep_its_brightness() -> None:
    view = CenterView(image_size=32, normalize=False)(_reopened(Image.fromarray(RAMP16), "PNG"))
    assert abs(float(view.float().mean()) - RAMP16.mean() / 257.0) < 3.0
