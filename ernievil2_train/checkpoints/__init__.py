"""Checkpoint reading (official Paddle `.pdparams`) and writing (safetensors + config)."""

from __future__ import annotations

from ernievil2_train.checkpoints.errors import CheckpointError
from ernievil2_train.checkpoints.io import (
    find_vocab,
    load_pretrained,
    load_training_checkpoint,
    save_pretrained,
)
from ernievil2_train.checkpoints.paddle import load_pdparams, read_pdparams

__all__ = [
    "CheckpointError",
    "find_vocab",
    "load_pdparams",
    "load_pretrained",
    "load_training_checkpoint",
    "read_pdparams",
    "save_pretrained",
]
