"""FSDP wrapping: one shard unit per transformer block of either tower."""

from __future__ import annotations

from torch.distributed.fsdp.wrap import ModuleWrapPolicy


def block_wrap_policy() -> ModuleWrapPolicy:
    """Wrap every timm ViT `Block` and every ERNIE encoder layer in its own FSDP unit."""
    from timm.models.vision_transformer import Block
    from transformers.models.ernie.modeling_ernie import ErnieLayer

    return ModuleWrapPolicy({Block, ErnieLayer})
