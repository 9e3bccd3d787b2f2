"""Tiny dual encoders and synthetic multi-view batches for the training tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from ernievil2_train.models import DualEncoder, create_model
from ernievil2_train.perf import HostSyncCounter

IMAGE_SIZE = 32
VOCAB = 64
SEQ = 12


def tiny_model(seed: int = 0, dropout: float = 0.0, dtype: torch.dtype = torch.float32) -> DualEncoder:
    torch.manual_seed(seed)
    model = create_model(
        {
            "vision": {"image_size": IMAGE_SIZE, "patch_size": 16, "width": 32, "layers": 2, "heads": 2},
            "text": {
                "vocab_size": VOCAB,
                "width": 32,
                "layers": 2,
                "heads": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 32,
                "dropout": dropout,
                "attention_dropout": dropout,
            },
        }
    )
    return model.to(dtype)


def _ids(n: int, g: torch.Generator, empty: torch.Tensor | None = None) -> torch.Tensor:
    ids = torch.zeros(n, SEQ, dtype=torch.long)
    lengths = torch.randint(2, SEQ - 1, (n,), generator=g)
    for i, length in enumerate(lengths.tolist()):
        ids[i, 0] = 1
        ids[i, 1 : length + 1] = torch.randint(4, VOCAB, (length,), generator=g)
        ids[i, length + 1] = 2
        if empty is not None and not bool(empty[i]):
            ids[i] = 0
    return ids


def make_batch(n: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The agreed batch dict: two image views, caption, text view, tags (some rows without tags), keys
    with duplicated images, a duplicated caption, text-view keys that group image 0's samples and (n >= 8)
    a tag sequence duplicated for another image."""
    g = torch.Generator().manual_seed(seed)
    image_ids = torch.arange(n)
    image_ids[1] = image_ids[n - 2] = 0  # three captions of image 0, one on each half of the batch
    has_tags = torch.ones(n, dtype=torch.bool)
    has_tags[2] = has_tags[n - 1] = False
    caption = _ids(n, g)
    caption[3] = caption[n - 3]  # an identical caption in both halves
    caption_key = torch.arange(n) + 1000
    caption_key[3] = caption_key[n - 3]
    text_view_key = caption_key.clone()
    text_view_key[1] = text_view_key[n - 2] = text_view_key[0]  # image 0's caption set (second_caption)
    image = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(dtype)
    image_view2 = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(dtype)
    text_view = _ids(n, g)
    tags = _ids(n, g, empty=has_tags)
    tags_key = torch.where(has_tags, torch.arange(n) + 2000, 0)  # every row without tags reads alike
    twin = n // 2  # image 0's tags again, for another image on the batch's other half
    if bool(has_tags[twin]) and image_ids[twin] != 0:
        tags[twin], tags_key[twin] = tags[0], tags_key[0]
    return {
        "image": image,
        "image_view2": image_view2,
        "caption_ids": caption,
        "text_view_ids": text_view,
        "tag_ids": tags,
        "has_tags": has_tags,
        "image_key": image_ids * 7919 + 13,
        "caption_key": caption_key,
        "tags_key": tags_key,
        "text_view_key": text_view_key,
    }


ALL_PAIRS = {"image_caption": 1.0, "image_tags": 0.5, "image_image": 0.25, "text_text": 0.75}


class SyncWatch(pl.Callback):
    """Counts host syncs from the start of batch 1 (batch 0 sets things up) to the end of the first epoch,
    before the epoch-end hooks."""

    def __init__(self) -> None:
        self.counter = HostSyncCounter()
        self.batches = 0
        self.active = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 1 and trainer.current_epoch == 0:
            self.counter.__enter__()
            self.active = True
        self.batches += self.active

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.active:
            self.counter.__exit__(None, None, None)
            self.active = False
