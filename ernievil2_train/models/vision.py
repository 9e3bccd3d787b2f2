"""Vision tower: a timm `VisionTransformer` configured as the ERNIE-ViL 2.0 (CLIP-style) ViT."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from timm.models.vision_transformer import VisionTransformer
from torch import nn

VISION_LN_EPS = 1e-6


@dataclass
class VisionConfig:
    """Architecture of the ViT image tower."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.width % self.heads:
            raise ValueError(f"vision.width {self.width} is not divisible by vision.heads {self.heads}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionConfig:
        return cls(**check_fields(cls, data, "vision"))


def create_vision_tower(cfg: VisionConfig) -> VisionTransformer:
    """Pre-norm ViT with QuickGELU, bias-free patch conv, final norm on all tokens, CLS output, no head."""
    return VisionTransformer(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.width,
        depth=cfg.layers,
        num_heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True,
        class_token=True,
        global_pool="token",
        num_classes=0,
        pre_norm=True,
        final_norm=True,
        fc_norm=False,
        norm_layer=partial(nn.LayerNorm, eps=VISION_LN_EPS),
        act_layer="quick_gelu",
        drop_path_rate=cfg.drop_path_rate,
    )


def check_fields(cls: type, data: dict[str, Any], section: str) -> dict[str, Any]:
    """Return a copy of `data` after checking that every key is a field of the dataclass `cls`."""
    unknown = sorted(set(data) - set(cls.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown {section} config field(s): {', '.join(unknown)}")
    return dict(data)
