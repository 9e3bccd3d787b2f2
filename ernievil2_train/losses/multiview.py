"""From a multi-view batch to losses: encode the needed views, gather once, apply `MultiViewInfoNCE`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ernievil2_train.distributed import (
    LocalBatchSize,
    all_gather_features,
    all_gather_metadata,
    world,
)
from ernievil2_train.losses.infonce import MultiViewInfoNCE
from ernievil2_train.models.dual_encoder import float32_or_wider

IMAGE_FEATURES = {"image": "image", "image_view2": "image_view2"}
TEXT_FEATURES = {"caption": "caption_ids", "text_view": "text_view_ids", "tags": "tag_ids"}
BATCH_KEYS = {**IMAGE_FEATURES, **TEXT_FEATURES}
Batch = dict[str, torch.Tensor]


def required_batch_keys(loss: MultiViewInfoNCE) -> dict[str, str]:
    """Batch key -> the loss pair that needs it, for the active pairs."""
    cfg = loss.config
    needed: dict[str, str] = {}
    for pair in cfg.active_pairs():
        spec = cfg.spec(pair)
        for name in (spec.rows, spec.cols):
            needed.setdefault(BATCH_KEYS[name], pair)
        if spec.tag_masked:
            needed.setdefault("has_tags", pair)
        if cfg.multi_positive:
            for key in spec.keys:  # the caption keys stand in for absent text-view keys
                needed.setdefault("caption_key" if key == "text_view_key" else key, pair)
    return needed


def encode_views(model: nn.Module, batch: Batch, names: list[str]) -> Batch:
    """Raw features [b, D] of the named views: all image views in ONE `encode_image` call, all text
    views in ONE `encode_text` call."""
    out: dict[str, torch.Tensor] = {}
    for encode, table in ((model.encode_image, IMAGE_FEATURES), (model.encode_text, TEXT_FEATURES)):
        wanted = [n for n in names if n in table]
        if not wanted:
            continue
        feats = encode(torch.cat([batch[table[n]] for n in wanted], dim=0))
        out.update(zip(wanted, feats.chunk(len(wanted), dim=0), strict=True))
    return out


def batch_metadata(batch: dict[str, torch.Tensor], size: int, device: torch.device) -> torch.Tensor:
    """Long[b, 5]: image_key, caption_key, has_tags, tags_key, text_view_key (unique per-sample stand-ins for
    absent keys; the caption keys for an absent text_view_key)."""
    rank, _ = world()
    fallback = torch.arange(rank * size, (rank + 1) * size, device=device)
    columns = [
        batch.get("image_key", fallback),
        batch.get("caption_key", fallback),
        batch.get("has_tags", torch.ones(size, dtype=torch.bool, device=device)),
        batch.get("tags_key", fallback),
        batch.get("text_view_key", batch.get("caption_key", fallback)),
    ]
    return torch.stack([c.to(device=device, dtype=torch.long) for c in columns], dim=1)


def gathered_losses(
    loss: MultiViewInfoNCE,
    local_features: dict[str, torch.Tensor],
    metadata: torch.Tensor,
    model_log_scale: torch.Tensor,
    local_size: LocalBatchSize | None = None,
) -> dict[str, torch.Tensor]:
    """Normalise (float32 or wider), gather features with ONE autograd all-gather and metadata with one
    more, then compute this rank's loss share (see `ernievil2_train.distributed`). `local_size` carries the
    equal-size check across steps (a fresh one checks with a collective)."""
    rank, world_size = world()
    (local_size or LocalBatchSize()).check(metadata.shape[0], metadata.device)
    normed = {n: F.normalize(float32_or_wider(f), dim=-1) for n, f in local_features.items()}
    feats = all_gather_features(normed)
    meta = all_gather_metadata(metadata)
    image_key, caption_key, has_tags, tags_key, text_view_key = meta.unbind(dim=1)
    return loss(feats, image_key, caption_key, has_tags.bool(), model_log_scale, rank, world_size, tags_key,
                text_view_key)
