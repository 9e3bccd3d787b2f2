"""`python -m ernievil2_train.convert` as a real subprocess."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ernievil2_train import convert
from ernievil2_train.checkpoints import find_vocab, load_pretrained
from tests.checkpoints.reference import ATOL, RTOL, load_npz, reference_heads


def _convert(*args: str | Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ernievil2_train.convert", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_converts_the_reference_checkpoint(paddle_ref: Path, tmp_path: Path) -> None:
    vision_heads, text_heads = reference_heads(paddle_ref)
    out = tmp_path / "ckpt"
    run = _convert(
        paddle_ref / "model.pdparams",
        out,
        "--vision-heads",
        vision_heads,
        "--text-heads",
        text_heads,
        "--vocab",
        paddle_ref / "vocab.txt",
    )
    assert run.returncode == 0, run.stderr
    assert f"{vision_heads} heads" in run.stdout and str(out) in run.stdout
    assert find_vocab(out).read_bytes() == (paddle_ref / "vocab.txt").read_bytes()
    model = load_pretrained(out)
    assert (model.config.vision.heads, model.config.text.heads) == (vision_heads, text_heads)
    ids = torch.from_numpy(load_npz(paddle_ref / "inputs.npz")["input_ids"])
    with torch.no_grad():
        pooled = model.encode_text(ids)
    want = torch.from_numpy(load_npz(paddle_ref / "outputs.npz")["text_pooled"])
    torch.testing.assert_close(pooled, want, atol=ATOL, rtol=RTOL)


def test_user_error_exits_2_with_one_line(paddle_ref: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "cut.pdparams"
    truncated.write_bytes((paddle_ref / "model.pdparams").read_bytes()[:100_000])
    run = _convert(truncated, tmp_path / "a")
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "truncated" in run.stderr and "Traceback" not in run.stderr


def _main_error(capsys: pytest.CaptureFixture[str], *args: str | Path) -> str:
    assert convert.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    return err


def test_user_errors_in_process(paddle_ref: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "not a .pdparams pickle" in _main_error(capsys, paddle_ref / "vocab.txt", tmp_path / "b")
    assert "no such file" in _main_error(capsys, tmp_path / "absent.pdparams", tmp_path / "c")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return __import__("os").system, (f"touch {marker}",)

    evil = tmp_path / "evil.pdparams"
    evil.write_bytes(pickle.dumps({"x": np.zeros(2, np.float32), "y": Evil()}, protocol=4))
    assert "refused to load global posix.system" in _main_error(capsys, evil, tmp_path / "d")
    assert not marker.exists() and not (tmp_path / "d").exists()
    err = _main_error(capsys, paddle_ref / "model.pdparams", tmp_path / "e", "--text-heads", "7")
    assert "not divisible by 7 heads" in err
