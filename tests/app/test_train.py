"""Building objects from config nodes, and choosing the checkpoint to resume from."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ernievil2_train.config_checks import ConfigError
from ernievil2_train.train import build, resume_checkpoint


def test_build_reports_a_missing_input_by_config_key(tmp_path: Path) -> None:
    node = OmegaConf.create({"_target_": "ernievil2_train.data.datamodule.MultiViewDataModule",
                             "train_shards": str(tmp_path), "vocab_file": str(tmp_path / "vocab.txt")})
    with pytest.raises(ConfigError, match=re.escape("config key 'data.datamodule': vocab_file")):
        build("data.datamodule", node)


def test_build_reports_an_invalid_value_by_config_key() -> None:
    node = OmegaConf.create({"_target_": "ernievil2_train.callbacks.export.ExportBestModel",
                             "dirpath": "x", "mode": "sideways"})
    with pytest.raises(ConfigError, match=re.escape("config key 'callbacks.export': ExportBestModel.mode")):
        build("callbacks.export", node)


def test_build_lets_other_errors_through() -> None:
    node = OmegaConf.create({"_target_": "ernievil2_train.callbacks.export.ExportBestModel", "nope": 1})
    with pytest.raises(Exception) as info:
        build("callbacks.export", node)
    assert not isinstance(info.value, ConfigError)


def test_resume_picks_the_newest_checkpoint_of_the_run_folder(tmp_path: Path) -> None:
    assert resume_checkpoint(None, tmp_path) is None
    with pytest.raises(ConfigError, match="ckpt_path"):
        resume_checkpoint("last", tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"")
    assert resume_checkpoint(None, tmp_path) == str(last)
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"")
    now = time.time()
    os.utime(last, (now - 10, now - 10))
    assert resume_checkpoint(None, tmp_path) == str(hpc)
    assert resume_checkpoint("last", tmp_path) == str(hpc)
    with pytest.raises(ConfigError, match="not found"):
        resume_checkpoint(str(tmp_path / "other.ckpt"), tmp_path)
