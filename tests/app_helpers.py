"""Helpers for tests of the training application: a tiny converted checkpoint and a failing callback."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl

from ernievil2_train.checkpoints.io import save_pretrained
from ernievil2_train.models import create_model

TINY_MODEL = {
    "vision": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "heads": 2},
    "text": {"vocab_size": 64, "width": 32, "layers": 1, "heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 64},
}


def tiny_checkpoint(out_dir: Path, vocab_file: Path) -> Path:
    """A converted-format checkpoint folder of a tiny random model, with `vocab_file` beside it."""
    return save_pretrained(create_model(TINY_MODEL), out_dir, vocab_file=vocab_file)


class FailsInValidation(pl.Callback):
    """A planted error while validation's loader workers run (`+callbacks.fail._target_=` this class)."""

    def on_validation_batch_end(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("planted failure in validation")
