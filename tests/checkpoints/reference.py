"""Helpers around the Paddle reference fixtures (sizes always read from config.json / arrays)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ernievil2_train.checkpoints import load_pdparams
from ernievil2_train.models import DualEncoder
from tests.conftest import paddle_ref_dir

REQUIRED_PDPARAMS = "model.pdparams"
OPTIONAL_PDPARAMS = "model_paddle3.pdparams"  # same weights re-saved by Paddle 3; a set may leave it out
ATOL, RTOL = 1e-5, 1e-4


def pdparams_files() -> tuple[str, ...]:
    """The checkpoint files of the reference set: the required one, plus the Paddle 3 copy when present."""
    optional = (OPTIONAL_PDPARAMS,) if (paddle_ref_dir() / OPTIONAL_PDPARAMS).is_file() else ()
    return (REQUIRED_PDPARAMS, *optional)


PDPARAMS_FILES = pdparams_files()


def reference_heads(ref: Path) -> tuple[int, int]:
    """(vision heads, text heads) of the reference model."""
    config = json.loads((ref / "config.json").read_text())
    return config["vision"]["heads"], config["text"]["num_attention_heads"]


def convert_reference(ref: Path, name: str = REQUIRED_PDPARAMS) -> DualEncoder:
    """The reference checkpoint converted with the head counts of config.json."""
    vision_heads, text_heads = reference_heads(ref)
    return load_pdparams(ref / name, vision_heads=vision_heads, text_heads=text_heads)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an `.npz` file, loaded into memory."""
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def preprocessed_rows(ref: Path) -> dict[int, str]:
    """Rows of `inputs.npz` pixel_values that are the official preprocessing of an image file: row -> file."""
    sources = load_npz(ref / "inputs.npz")["pixel_sources"]
    prefix = "preprocess:"
    return {row: str(s).removeprefix(prefix) for row, s in enumerate(sources) if str(s).startswith(prefix)}


def tokenizer_config(ref: Path) -> dict:
    """The `tokenizer` section of config.json (ids, text length, vocabulary facts)."""
    return json.loads((ref / "config.json").read_text())["tokenizer"]


def preprocessing_config(ref: Path) -> dict:
    """The `preprocessing` section of config.json (short side, crop size, mean, std)."""
    return json.loads((ref / "config.json").read_text())["preprocessing"]
