"""Optimizer parameter groups (per-tower lr, layer-wise lr decay, no-decay rules) and the lr schedule."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from ernievil2_train.config_checks import ConfigError, check_number, check_positive_int, dataclass_from

# No weight decay, by name: biases, norm weights, temperatures, embedding tables and tokens. For the two
# towers these are exactly their 0/1-dim parameters plus the embeddings; the names decide alone when the
# shapes are gone (FSDP with `use_orig_params` turns every parameter into a flat 1-dim view of its shard).
NO_DECAY_NAME = re.compile(
    r"(\.bias$|_embeddings\.weight$|(^|\.)[^.]*(norm|Norm)[^.]*\.weight$|(^|\.)log_scales\.[^.]+$"
    r"|(^|\.)(cls_token|pos_embed|class_embedding|positional_embedding|logit_scale)$)"
)
LAYER_INDEX = re.compile(r"(?:^|\.)(?:blocks|layer|layers)\.(\d+)\.")
STEM_NAME = re.compile(r"(^|\.)(cls_token|pos_embed|patch_embed|norm_pre|embeddings)(\.|$)")


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm weights, scalar temperatures and embedding tables/tokens are not decayed; so is any other
    0/1-dim parameter, unless FSDP has flattened it (then its shape says nothing)."""
    if NO_DECAY_NAME.search(name):
        return True
    return param.ndim <= 1 and not getattr(param, "_fsdp_flattened", False)


def layer_id(name: str, num_layers: int) -> int:
    """0 for the stem (patch/word/position embeddings), i+1 for block i, num_layers+1 for the head."""
    match = LAYER_INDEX.search(name)
    if match:
        return int(match.group(1)) + 1
    return 0 if STEM_NAME.search(name) else num_layers + 1


def count_layers(names: list[str]) -> int:
    ids = [int(m.group(1)) for n in names if (m := LAYER_INDEX.search(n))]
    return max(ids) + 1 if ids else 0


def group_name(tower: str, layer: int, depth: int, by_layer: bool, decay: bool) -> str:
    """`vision/decay`; by layer `vision/stem/decay`, `vision/block0/no_decay`, ..., `vision/head/decay`
    (the lr monitor logs each group's lr under this name)."""
    kind = "decay" if decay else "no_decay"
    if not by_layer:
        return f"{tower}/{kind}"
    part = "stem" if layer == 0 else "head" if layer == depth else f"block{layer - 1}"
    return f"{tower}/{part}/{kind}"


def tower_param_groups(
    tower: str,
    named: list[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
    layer_decay: float = 1.0,
) -> list[dict[str, Any]]:
    """Groups for one tower: split by (decay, layer); lr scaled by layer_decay ** (depth - layer)."""
    named = [(n, p) for n, p in named if p.requires_grad]
    depth = count_layers([n for n, _ in named]) + 1
    groups: dict[tuple[bool, int], dict[str, Any]] = {}
    for name, param in named:
        decay = not no_weight_decay(name, param)
        layer = layer_id(name, depth - 1) if layer_decay != 1.0 else depth
        group = groups.setdefault(
            (decay, layer),
            {
                "name": group_name(tower, layer, depth, layer_decay != 1.0, decay),
                "params": [],
                "param_names": [],
                "lr": lr * layer_decay ** (depth - layer),
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]


# what an optimizer raises for a setting it refuses: a negative lr (ValueError), a single beta (IndexError),
# a setting of another optimizer (TypeError)
OPTIMIZER_REFUSALS = (ValueError, TypeError, IndexError)


@dataclass
class ScheduleConfig:
    """Linear warmup (steps, or a ratio of the total) then cosine decay to `min_lr_ratio` of the peak."""

    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    total_steps: int | None = None

    def __post_init__(self) -> None:
        if self.warmup_steps != 0:
            check_positive_int(self.warmup_steps, "scheduler.warmup_steps")
        if self.total_steps is not None:
            check_positive_int(self.total_steps, "scheduler.total_steps")
        check_number(self.warmup_ratio, "scheduler.warmup_ratio")
        check_number(self.min_lr_ratio, "scheduler.min_lr_ratio")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"scheduler.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set either scheduler.warmup_steps or scheduler.warmup_ratio, not both")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"scheduler.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    @classmethod
    def from_any(cls, value: ScheduleConfig | dict[str, Any] | None) -> ScheduleConfig:
        return dataclass_from(cls, value, "scheduler")

    def warmup(self, total_steps: int) -> int:
        """Warmup steps of a run of `total_steps` optimizer steps; a warmup as long as the run is refused (the
        lr would never reach its peak nor decay)."""
        if self.warmup_steps >= total_steps > 0:
            raise ConfigError(
                f"config key 'module.scheduler.warmup_steps': {self.warmup_steps} warmup steps, but the run "
                f"has {total_steps} optimizer steps; set fewer (or module.scheduler.warmup_ratio)"
            )
        return self.warmup_steps or min(round(self.warmup_ratio * total_steps), max(total_steps - 1, 0))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """lr multiplier at optimizer step `step` (0-based): (step+1)/warmup during warmup, then cosine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global norm of `model`'s gradients at `max_norm`: a sharded (FSDP) model's own clipping,
    whose norm spans every rank's shards, else torch's. No host sync: the scale is applied on the device."""
    if isinstance(model, FullyShardedDataParallel):
        return model.clip_grad_norm_(max_norm)
    grads = [p for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(grads, max_norm)
