"""Any decoded PIL image as 8-bit RGB, high bit depths scaled rather than clipped (PIL and numpy only: the
recipes use it without importing torch)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` in mode RGB. Integer grayscale beyond 8 bits (`I;16*`, and `I`: how PIL opens 16-bit PNG and
    TIFF) is scaled from 16 bits to 8, where PIL's own conversion clips it to white; floats (`F`) are scaled
    from 0..1 when they lie within it."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):
        gray = np.asarray(image, dtype=np.float64) / 257.0  # 65535 -> 255
    elif image.mode == "F":
        gray = np.asarray(image, dtype=np.float64)
        if gray.size and np.nanmax(gray) <= 1.0:
            gray = gray * 255.0
    else:
        return image.convert("RGB")
    gray = np.nan_to_num(np.rint(gray), nan=0.0)
    return Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8), "L").convert("RGB")
