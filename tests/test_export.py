"""`python -m ernievil2_train.export` as a real subprocess, on a checkpoint written by a real Trainer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from ernievil2_train.checkpoints import find_vocab, load_pretrained
from ernievil2_train.module import ErnieVil2Module
from tests.training_helpers import ALL_PAIRS, make_batch, tiny_model


def _export(*args: str | Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ernievil2_train.export", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, ErnieVil2Module]:
    """A run folder with `checkpoints/last.ckpt` after two training steps and `export/vocab.txt`."""
    run_dir = tmp_path_factory.mktemp("run")
    batch = make_batch(16)
    samples = [{k: v[i] for k, v in batch.items()} for i in range(16)]
    module = ErnieVil2Module(tiny_model(), loss={"weights": ALL_PAIRS})
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(samples, batch_size=8, drop_last=True))
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    (run_dir / "export").mkdir()
    (run_dir / "export" / "vocab.txt").write_text("[PAD]\t0\n[CLS]\t1\n[SEP]\t2\n[UNK]\t3\n")
    return run_dir, module


def test_exports_the_trained_weights_with_the_run_vocab(run, tmp_path):
    run_dir, module = run
    result = _export(run_dir / "checkpoints" / "last.ckpt", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "with" in result.stdout and "vocab.txt" in result.stdout
    model = load_pretrained(tmp_path / "out")
    assert model.config == module.model.config
    trained = module.model.state_dict()
    exported = model.state_dict()
    assert set(exported) == set(trained)
    for name, value in trained.items():
        assert torch.equal(exported[name], value), name
    assert find_vocab(tmp_path / "out").read_bytes() == (run_dir / "export" / "vocab.txt").read_bytes()


def _error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_bad_checkpoints_are_one_line_errors(run, tmp_path):
    assert "checkpoint file not found" in _error(_export(tmp_path / "nope.ckpt", tmp_path / "o1"))
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    assert "not a readable training checkpoint" in _error(_export(junk, tmp_path / "o2"))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    assert "no model config" in _error(_export(foreign, tmp_path / "o3"))
    sharded = tmp_path / "sharded.ckpt"
    sharded.mkdir()
    assert "consolidate it" in _error(_export(sharded, tmp_path / "o4"))
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
