"""Vision side: the official eval transform."""

from __future__ import annotations

from ernievil2_train.vision.transforms import ImageDecodeError, eval_transform

__all__ = ["ImageDecodeError", "eval_transform"]
