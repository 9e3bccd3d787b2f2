"""Vision side: the official eval transform."""

from __future__ import annotations

from ernievil2_train.vision.transforms import ImageDecodeError, ImageTooLarge, eval_transform, quiet_opencv

__all__ = ["ImageDecodeError", "ImageTooLarge", "eval_transform", "quiet_opencv"]
