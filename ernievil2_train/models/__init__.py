"""Model library: the ERNIE-ViL 2.0 dual encoder built from timm and transformers parts."""

from __future__ import annotations

from ernievil2_train.models.dual_encoder import DualEncoder, DualEncoderConfig
from ernievil2_train.models.presets import PRESETS, create_model
from ernievil2_train.models.text import TextConfig, TextTower, trim_padding
from ernievil2_train.models.vision import VisionConfig, create_vision_tower

__all__ = [
    "PRESETS",
    "DualEncoder",
    "DualEncoderConfig",
    "TextConfig",
    "TextTower",
    "VisionConfig",
    "create_model",
    "create_vision_tower",
    "trim_padding",
]
