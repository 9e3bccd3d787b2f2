"""Helpers around the Paddle reference fixtures (sizes always read from config.json / arrays)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ernievil2_train.checkpoints import load_pdparams
from ernievil2_train.models import DualEncoder

PDPARAMS_FILES = ("model.pdparams", "model_paddle3.pdparams")
ATOL, RTOL = 1e-5, 1e-4


def reference_heads(ref: Path) -> tuple[int, int]:
    """(vision heads, text heads) of the reference model."""
    config = json.loads((ref / "config.json").read_text())
    return config["vision"]["heads"], config["text"]["num_attention_heads"]


def convert_reference(ref: Path, name: str = "model.pdparams") -> DualEncoder:
    vision_heads, text_heads = reference_heads(ref)
    return load_pdparams(ref / name, vision_heads=vision_heads, text_heads=text_heads)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
