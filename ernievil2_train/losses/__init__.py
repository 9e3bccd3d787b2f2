"""Contrastive losses (distributed, multi-positive aware)."""

from __future__ import annotations

from ernievil2_train.losses.infonce import (
    MAX_LOG_SCALE,
    PAIRS,
    LossConfig,
    MultiViewInfoNCE,
    symmetric_infonce,
)

__all__ = ["MAX_LOG_SCALE", "PAIRS", "LossConfig", "MultiViewInfoNCE", "symmetric_infonce"]
