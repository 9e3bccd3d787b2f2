"""Multi-view symmetric InfoNCE: image↔caption, image↔tags, image↔image and text↔text.

Feature names (the module encodes only what an active pair needs):
  "image" / "image_view2"  the two augmented image views,
  "caption", "text_view", "tags"  the text views.
Image↔caption pairs `caption` with image view `caption_image_view` (1 or 2) and image↔tags pairs `tags` with
image view `tags_image_view`; both default to view 1. Image↔image pairs view 1 with view 2, text↔text pairs
`caption` with `text_view`.

Distributed contract: the loss receives the GATHERED, L2-normalised features of the global batch
(rank-major) and computes this rank's local rows against all columns, normalised so that the mean of the
per-rank losses equals the global-batch loss (see `ernievil2_train.distributed`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ernievil2_train.config_checks import dataclass_from
from ernievil2_train.models.dual_encoder import (
    OFFICIAL_LOGIT_SCALE_INIT,
    accept_zero_dim_temperatures,
    temperature_parameter,
)

MAX_LOG_SCALE = math.log(100.0)
PAIRS = ("image_caption", "image_tags", "image_image", "text_text")
TEMPERATURE_MODES = ("per_pair", "shared", "fixed")
IMAGE_VIEWS = {1: "image", 2: "image_view2"}


@dataclass(frozen=True)
class PairSpec:
    """One symmetric loss: row features, column features, the keys any of whose equality marks positives,
    tag mask."""

    rows: str
    cols: str
    keys: tuple[str, ...]
    tag_masked: bool = False


@dataclass
class LossConfig:
    """Weight per pair (0 turns a pair off and skips its compute), temperature mode, positives, pairing."""

    weights: dict[str, float] = field(default_factory=lambda: {"image_caption": 1.0})
    temperature: str = "per_pair"
    temperature_init: float = OFFICIAL_LOGIT_SCALE_INIT
    multi_positive: bool = False
    caption_image_view: int = 1
    tags_image_view: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.weights, Mapping):
            raise ValueError(f"module.loss.weights must map pair names to weights, got {self.weights!r}")
        weights = {str(k): v for k, v in self.weights.items()}
        unknown = sorted(set(weights) - set(PAIRS))
        if unknown:
            raise ValueError(f"unknown module.loss.weights key(s) {unknown}; choose from {list(PAIRS)}")
        for pair, weight in weights.items():
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
                raise ValueError(f"module.loss.weights.{pair} must be a finite number, got {weight!r}")
        self.weights = {pair: float(weight) for pair, weight in weights.items()}
        if any(w < 0 for w in self.weights.values()):
            raise ValueError(f"module.loss.weights must be >= 0, got {self.weights}")
        if not self.active_pairs():
            raise ValueError("module.loss.weights: every pair has weight 0, nothing to train")
        if self.temperature not in TEMPERATURE_MODES:
            raise ValueError(
                f"module.loss.temperature must be one of {TEMPERATURE_MODES}, got {self.temperature!r}"
            )
        for name in ("caption_image_view", "tags_image_view"):
            view = getattr(self, name)
            if isinstance(view, bool) or view not in IMAGE_VIEWS:
                raise ValueError(f"module.loss.{name} must be 1 or 2, got {view!r}")
        if not isinstance(self.multi_positive, bool):
            raise ValueError(f"module.loss.multi_positive must be true or false, got {self.multi_positive!r}")
        init = self.temperature_init
        if isinstance(init, bool) or not isinstance(init, int | float) or not 0.0 <= init <= MAX_LOG_SCALE:
            raise ValueError(
                f"module.loss.temperature_init (a log logit scale) must be a number in [0, ln 100 = "
                f"{MAX_LOG_SCALE:.4f}], the range the training clamps it to; got {init!r}"
            )
        self.temperature_init = float(init)

    @classmethod
    def from_any(cls, value: LossConfig | dict[str, Any] | None) -> LossConfig:
        return dataclass_from(cls, value, "loss")

    def active_pairs(self) -> list[str]:
        return [p for p in PAIRS if self.weights.get(p, 0.0) > 0]

    def spec(self, pair: str) -> PairSpec:
        return {
            # an image and a caption (tags) written alike for another image match each other as well
            "image_caption": PairSpec(IMAGE_VIEWS[self.caption_image_view], "caption",
                                      ("image_key", "caption_key")),
            "image_tags": PairSpec(IMAGE_VIEWS[self.tags_image_view], "tags", ("image_key", "tags_key"),
                                   tag_masked=True),
            "image_image": PairSpec("image", "image_view2", ("image_key",)),
            "text_text": PairSpec("caption", "text_view", ("text_view_key",)),
        }[pair]

    def required_features(self) -> list[str]:
        """Feature names the active pairs need, in a fixed order."""
        needed = {name for p in self.active_pairs() for name in (self.spec(p).rows, self.spec(p).cols)}
        return [n for n in ("image", "image_view2", "caption", "text_view", "tags") if n in needed]


def _direction(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    labels: torch.Tensor,
    positives: torch.Tensor | None,
    col_valid: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy of `rows` [b,D] against `cols` [N,D] and per-row top-1 hits. The logits are
    computed in the features' own precision, also under mixed precision (autocast would take bf16)."""
    with torch.autocast(rows.device.type, enabled=False):
        logits = scale * rows @ cols.T
    if col_valid is not None:
        logits = logits.masked_fill(~col_valid, float("-inf"))
    if positives is None:
        per_row = F.cross_entropy(logits, labels, reduction="none")
        hits = logits.argmax(dim=-1) == labels
        return per_row, hits
    target = positives.to(logits.dtype) / positives.sum(dim=-1, keepdim=True)
    log_probs = logits.log_softmax(dim=-1).masked_fill(~positives, 0.0)
    per_row = -(target * log_probs).sum(dim=-1)
    hits = positives.gather(1, logits.argmax(dim=-1, keepdim=True)).squeeze(1)
    return per_row, hits


def symmetric_infonce(
    rows_a: torch.Tensor,
    cols_b: torch.Tensor,
    rows_b: torch.Tensor,
    cols_a: torch.Tensor,
    scale: torch.Tensor,
    offset: int,
    world_size: int = 1,
    keys: Sequence[torch.Tensor] | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the symmetric InfoNCE loss and its local top-1 accuracy.

    rows_*: local normalised features [b, D]; cols_*: gathered normalised features [N, D] (rank-major);
    offset: global index of the first local row. keys, each [N]: samples equal in any of them are positives
    of each other (soft uniform target); None means the diagonal only. valid [N] bool: samples that take part
    (others drop out as rows and as columns). The returned loss is
    `world_size * sum(local rows) / (2 * n_valid)`, so that its mean over ranks is the global-batch loss.
    """
    b, n = rows_a.shape[0], cols_b.shape[0]
    local = slice(offset, offset + b)
    labels = torch.arange(offset, offset + b, device=rows_a.device)
    if isinstance(keys, torch.Tensor):
        raise TypeError("keys: a sequence of [N] key tensors (positives share any of them), not one tensor")
    positives = None
    for key in keys or ():
        same = key[local, None] == key[None, :]
        positives = same if positives is None else positives | same
    col_valid = None
    if valid is not None:
        # rows that do not take part see every column, so their (discarded) loss stays finite
        col_valid = valid[None, :] | ~valid[local, None]
        if positives is not None:
            positives = positives & col_valid
    loss_ab, hits_ab = _direction(rows_a, cols_b, scale, labels, positives, col_valid)
    loss_ba, hits_ba = _direction(rows_b, cols_a, scale, labels, positives, col_valid)
    if valid is None:
        n_valid = torch.full((), float(n), dtype=loss_ab.dtype, device=rows_a.device)  # no host copy
        local_valid = torch.ones(b, dtype=torch.bool, device=rows_a.device)
    else:
        n_valid = valid.sum().to(loss_ab.dtype)
        local_valid = valid[local]
    weight = local_valid.to(loss_ab.dtype)
    loss = world_size * ((loss_ab + loss_ba) * weight).sum() / (2 * n_valid.clamp(min=1))
    hits = (hits_ab & local_valid).sum() + (hits_ba & local_valid).sum()
    acc = hits / (2 * local_valid.sum().clamp(min=1))
    return loss, acc


class MultiViewInfoNCE(nn.Module):
    """The weighted sum of the active symmetric InfoNCE pairs, with their temperatures.

    Temperatures are log logit scales. image↔caption always uses the DualEncoder's `logit_scale` (passed to
    `forward`), so a converted checkpoint's `temperature_b` is trained and exported. Mode "per_pair" adds one
    learnable log-scale per other active pair (here, in `log_scales`, init `temperature_init`); "shared" uses
    the model's for every pair; "fixed" uses the model's value, detached, for every pair.
    """

    def __init__(self, config: LossConfig | dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = LossConfig.from_any(config)
        self.log_scales = nn.ParameterDict()
        if self.config.temperature == "per_pair":
            for pair in self.config.active_pairs():
                if pair != "image_caption":
                    self.log_scales[pair] = temperature_parameter(self.config.temperature_init)
        self.register_load_state_dict_pre_hook(accept_zero_dim_temperatures)

    def log_scale(self, pair: str, model_log_scale: torch.Tensor) -> torch.Tensor:
        if self.config.temperature == "fixed":
            return model_log_scale.detach()
        if pair in self.log_scales:
            return self.log_scales[pair]
        return model_log_scale

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep every loss-owned log-scale in [0, ln 100]."""
        for p in self.log_scales.values():
            p.clamp_(0.0, MAX_LOG_SCALE)

    def forward(
        self,
        features: dict[str, torch.Tensor],
        image_key: torch.Tensor,
        caption_key: torch.Tensor,
        has_tags: torch.Tensor | None,
        model_log_scale: torch.Tensor,
        rank: int = 0,
        world_size: int = 1,
        tags_key: torch.Tensor | None = None,
        text_view_key: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Gathered normalised features [N, D] and metadata [N] -> {"loss", "loss_<pair>", "acc_<pair>"}.
        `has_tags` and `tags_key` are only read by the image↔tags pair (None will do when it is off; without
        `tags_key`, alike tag sequences of different images are negatives of each other); `text_view_key`
        only by text↔text (without it, the caption keys)."""
        n = image_key.shape[0]
        if n % world_size:
            raise ValueError(f"global batch {n} is not a multiple of world size {world_size}")
        b = n // world_size
        offset = rank * b
        text_view_key = caption_key if text_view_key is None else text_view_key
        keys = {"image_key": image_key, "caption_key": caption_key, "tags_key": tags_key,
                "text_view_key": text_view_key}
        out: dict[str, torch.Tensor] = {}
        total = None
        for pair in self.config.active_pairs():
            spec = self.config.spec(pair)
            if spec.tag_masked and has_tags is None:
                raise ValueError(f"has_tags: the {pair} pair needs it (which samples have tags)")
            rows_all, cols_all = features[spec.rows], features[spec.cols]
            pair_keys = [keys[k] for k in spec.keys if keys[k] is not None]
            loss, acc = symmetric_infonce(
                rows_all[offset : offset + b],
                cols_all,
                cols_all[offset : offset + b],
                rows_all,
                self.log_scale(pair, model_log_scale).exp(),
                offset,
                world_size,
                keys=pair_keys if self.config.multi_positive else None,
                valid=has_tags.bool() if spec.tag_masked else None,
            )
            out[f"loss_{pair}"], out[f"acc_{pair}"] = loss, acc
            weighted = self.config.weights[pair] * loss
            total = weighted if total is None else total + weighted
        out["loss"] = total
        return out
