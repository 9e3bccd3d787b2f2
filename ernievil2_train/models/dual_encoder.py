"""The ERNIE-ViL 2.0 dual encoder: ViT image tower, ERNIE text tower, learnable log logit scale."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ernievil2_train.config_checks import check_fields, check_number
from ernievil2_train.models.text import TextConfig, TextTower
from ernievil2_train.models.vision import VisionConfig, create_vision_tower

OFFICIAL_LOGIT_SCALE_INIT = 2.65926


@dataclass
class DualEncoderConfig:
    """Both towers plus the initial log logit scale (official `temperature_b`)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    logit_scale_init: float = OFFICIAL_LOGIT_SCALE_INIT

    def __post_init__(self) -> None:
        if not isinstance(self.vision, VisionConfig) or not isinstance(self.text, TextConfig):
            raise ValueError("DualEncoderConfig takes a VisionConfig and a TextConfig (from_dict: dicts)")
        self.logit_scale_init = check_number(self.logit_scale_init, "logit_scale_init")
        if self.vision.width != self.text.width:
            raise ValueError(
                f"vision.width ({self.vision.width}) must equal text.width ({self.text.width}): "
                "the towers share one embedding space without projection"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "vision": self.vision.to_dict(),
            "text": self.text.to_dict(),
            "logit_scale_init": self.logit_scale_init,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DualEncoderConfig:
        data = check_fields(cls, data, "model")
        return cls(
            vision=VisionConfig.from_dict(data.get("vision", {})),
            text=TextConfig.from_dict(data.get("text", {})),
            logit_scale_init=data.get("logit_scale_init", OFFICIAL_LOGIT_SCALE_INIT),
        )


def temperature_parameter(value: float) -> nn.Parameter:
    """A learnable log logit scale: a 1-element tensor, as the official `temperature_b` (FSDP cannot shard a
    0-dim parameter). Where it scales logits it is used as is or as `.squeeze(0)`."""
    return nn.Parameter(torch.full((1,), float(value)))


def loadable_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """The parameter shape a saved tensor of `shape` loads into: a 0-dim one (a temperature of an older
    checkpoint) into a 1-element parameter, any other into its own shape."""
    return (1,) if tuple(shape) == () else tuple(shape)


def accept_zero_dim_temperatures(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load-state-dict pre-hook: a checkpoint holding a temperature as a 0-dim tensor (written before they
    were 1-element tensors) loads into the 1-element parameter."""
    for name, param in module.named_parameters(recurse=False):
        value = state_dict.get(prefix + name)
        if isinstance(value, torch.Tensor) and value.ndim == 0 and param.shape == (1,):
            state_dict[prefix + name] = value.reshape(1)


def float32_or_wider(x: torch.Tensor) -> torch.Tensor:
    """`x` as float32 (float64 stays), so feature gradients keep their precision under mixed precision."""
    return x if x.dtype == torch.float64 else x.float()


def check_pixels(pixel_values: Any) -> None:
    """TypeError / ValueError unless `pixel_values` is a floating-point [B, 3, H, W] tensor (shapes and
    dtypes only: nothing is read from the device)."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values: a float tensor [B, 3, H, W], got {type(pixel_values).__name__}")
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values: {pixel_values.dtype} pixels; normalise them first (uint8 crops: "
                         "ernievil2_train.vision.transforms.normalize_crops)")
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values: shape {list(pixel_values.shape)}, expected [B, 3, H, W]")


def check_ids(input_ids: Any, positions: int) -> None:
    """TypeError / ValueError unless `input_ids` is an integer [B, L] tensor with L <= `positions`."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids: an integer tensor [B, L] (the tokenizer's 'input_ids'), got "
                        f"{type(input_ids).__name__}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids: {input_ids.dtype} values, expected token ids (an integer dtype)")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids: shape {list(input_ids.shape)}, expected [B, L]")
    if input_ids.shape[1] > positions:
        raise ValueError(f"input_ids: {input_ids.shape[1]} tokens per row, more than the model's {positions} "
                         "text positions (max_position_embeddings)")


class DualEncoder(nn.Module):
    """Image and text encoders whose CLS / pooled outputs live in one `embed_dim` space."""

    def __init__(self, config: DualEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = create_vision_tower(config.vision)
        self.text = TextTower(config.text)
        self.logit_scale = temperature_parameter(config.logit_scale_init)
        self.register_load_state_dict_pre_hook(accept_zero_dim_temperatures)

    @property
    def embed_dim(self) -> int:
        return self.config.vision.width

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Float[B,3,H,W] (normalised pixels) -> [B,D]: the CLS token after the final norm. `normalize`:
        L2-normalised, in float32 (or wider), whatever the autocast dtype."""
        check_pixels(pixel_values)
        if pixel_values.shape[0] == 0:
            return pixel_values.new_zeros(0, self.embed_dim)
        features = self.vision(pixel_values)
        return F.normalize(float32_or_wider(features), dim=-1) if normalize else features

    def encode_text(self, input_ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Long[B,L] -> [B,D]: the pooled output (`normalize`: as in `encode_image`). Pad columns are masked
        but still cost compute: trim them on the host with `trim_padding` before moving the ids to an
        accelerator (finding the length there would wait for the device)."""
        check_ids(input_ids, self.config.text.max_position_embeddings)
        if input_ids.shape[0] == 0:
            return self.logit_scale.new_zeros(0, self.embed_dim)
        features = self.text(input_ids).pooler_output
        return F.normalize(float32_or_wider(features), dim=-1) if normalize else features

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalized image and text embeddings and the logit scale `exp(logit_scale)`."""
        return (
            self.encode_image(pixel_values, normalize=True),
            self.encode_text(input_ids, normalize=True),
            self.logit_scale.exp().squeeze(0),
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn activation checkpointing on or off in both towers."""
        self.vision.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)
