"""Vision tower: a timm `VisionTransformer` configured as the ERNIE-ViL 2.0 (CLIP-style) ViT."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ernievil2_train.config_checks import check_fields, check_number, check_positive_int

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
        for name in ("image_size", "patch_size", "width", "layers", "heads"):
            check_positive_int(getattr(self, name), f"vision.{name}")
        self.mlp_ratio = check_number(self.mlp_ratio, "vision.mlp_ratio")
        if self.mlp_ratio <= 0:
            raise ValueError(f"vision.mlp_ratio must be positive, got {self.mlp_ratio!r}")
        self.drop_path_rate = check_number(self.drop_path_rate, "vision.drop_path_rate", 0.0, 1.0)
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


class LinearPatchEmbed(PatchEmbed):
    """timm's `PatchEmbed` (same `proj` parameters) computed as one matrix product over flattened patches.

    A stride-p convolution over non-overlapping patches is a GEMM; written as one it runs at matmul speed
    instead of the much slower convolution kernels.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        ph, pw = self.patch_size
        if self.strict_img_size and (h, w) != tuple(self.img_size):
            raise ValueError(f"input image size {h}x{w} does not match the model's {self.img_size}")
        patches = x.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(b, -1, c * ph * pw)
        return self.norm(F.linear(patches, self.proj.weight.flatten(1), self.proj.bias))


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
        embed_layer=LinearPatchEmbed,
    )
