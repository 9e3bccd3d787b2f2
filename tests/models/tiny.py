"""Tiny model configs shared by the model, checkpoint and CLI tests."""

from __future__ import annotations

from typing import Any

from ernievil2_train.models import DualEncoder, create_model

TINY: dict[str, Any] = {
    "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2},
    "text": {"vocab_size": 50, "width": 32, "layers": 2, "heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 16},
}


def tiny_model(**overrides: Any) -> DualEncoder:
    """A seeded-independent tiny dual encoder in eval mode."""
    return create_model(TINY, **overrides).eval()
