"""`python -m ernievil2_train.export` as a real subprocess, on a checkpoint written by a real Trainer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from ernievil2_train import export
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


def test_bad_checkpoints_are_one_line_errors(run, tmp_path, paddle_ref):
    assert "checkpoint file not found" in _error(_export(tmp_path / "nope.ckpt", tmp_path / "o1"))
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    assert "not a readable training checkpoint" in _error(_export(junk, tmp_path / "o2"))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    assert "no model config" in _error(_export(foreign, tmp_path / "o3"))
    sharded = tmp_path / "sharded.ckpt"
    sharded.mkdir()
    (sharded / "meta.pt").write_bytes(b"")
    (sharded / "__0_0.distcp").write_bytes(b"")
    assert "consolidate it" in _error(_export(sharded, tmp_path / "o4"))
    pdparams = tmp_path / "pd.ckpt"
    pdparams.write_bytes((paddle_ref / "model.pdparams").read_bytes())
    assert "a plain pickle (a .pdparams file?)" in _error(_export(pdparams, tmp_path / "o5"))
    converted = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(converted))
    assert _error(_export(converted, tmp_path / "o6")).endswith(
        "(no state_dict); a converted model's weights: its folder is used as it is")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))


def _main_error(capsys, *args) -> str:
    assert export.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err.removeprefix("error: ")


def test_a_run_folder_points_to_its_checkpoint(run, tmp_path, capsys):
    run_dir, _ = run
    err = _main_error(capsys, run_dir, tmp_path / "out")
    assert err == f"{run_dir}: is a folder; pass a .ckpt file (e.g. {run_dir / 'checkpoints' / 'last.ckpt'})"
    assert not (tmp_path / "out").exists()


def test_output_file_and_input_as_output_are_refused(run, tmp_path, capsys):
    run_dir, _ = run
    ckpt = tmp_path / "copy.ckpt"
    ckpt.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes())
    before = ckpt.read_bytes()
    assert "the output folder is the input file" in _main_error(capsys, ckpt, ckpt)
    assert ckpt.read_bytes() == before
    existing = tmp_path / "a_file"
    existing.write_text("keep me")
    err = _main_error(capsys, ckpt, existing)
    assert err == f"{existing}: is a file, not a folder; choose a folder for the checkpoint"
    assert existing.read_text() == "keep me"


def test_without_a_run_vocab_the_training_datas_vocab_is_copied_or_the_folders_kept(run, tmp_path, capsys):
    """A checkpoint outside its run folder (or of a run stopped before its first export) takes the vocabulary
    its data module recorded; without one, a vocab.txt already in the output folder stays and is said to."""
    run_dir, _ = run
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    vocab = run_dir / "export" / "vocab.txt"
    moved = tmp_path / "moved.ckpt"
    torch.save({**checkpoint, "MultiViewDataModule": {"vocab_file": str(vocab)}}, moved)
    out = tmp_path / "out"
    assert export.main([str(moved), str(out)]) == 0
    assert capsys.readouterr().out.endswith(f"parameters (with {vocab})\n")
    assert find_vocab(out).read_bytes() == vocab.read_bytes()
    bare = tmp_path / "bare.ckpt"
    torch.save(checkpoint, bare)
    assert export.main([str(bare), str(out)]) == 0
    assert capsys.readouterr().out.endswith("parameters (kept its vocab.txt)\n")
    assert find_vocab(out).read_bytes() == vocab.read_bytes()
    assert export.main([str(bare), str(tmp_path / "new")]) == 0
    assert capsys.readouterr().out.endswith("parameters (no vocab.txt (--vocab copies one in))\n")
    assert find_vocab(tmp_path / "new") is None


def test_vocabulary_must_fit_the_model(run, tmp_path, capsys):
    run_dir, module = run
    vocab_size = module.model.config.text.vocab_size
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    garbage = tmp_path / "garbage.txt"
    garbage.write_bytes(bytes(range(128, 256)) * 8)
    too_big = tmp_path / "big.txt"
    too_big.write_text(f"[PAD]\t0\n[CLS]\t1\n[SEP]\t2\n[UNK]\t{vocab_size}\n")
    out = tmp_path / "out"
    assert "UTF-8" in _main_error(capsys, ckpt, out, "--vocab", garbage)
    err = _main_error(capsys, ckpt, out, "--vocab", too_big)
    assert err.startswith(f"{too_big}: ids go up to {vocab_size} but the model's text vocab_size is ")
    assert not out.exists()


def test_invalid_model_config_and_cut_file(run, tmp_path, capsys):
    run_dir, _ = run
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    checkpoint["model_config"]["text"]["heads"] = 0
    zero_heads = tmp_path / "zero.ckpt"
    torch.save(checkpoint, zero_heads)
    err = _main_error(capsys, zero_heads, tmp_path / "out")
    assert err == f"{zero_heads}: invalid model config (text.heads must be a positive integer, got 0)"
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(zero_heads.read_bytes()[: zero_heads.stat().st_size // 2])
    err = _main_error(capsys, cut, tmp_path / "out")
    assert err.startswith(f"{cut}: not a readable training checkpoint (RuntimeError: ")
    assert not (tmp_path / "out").exists()
