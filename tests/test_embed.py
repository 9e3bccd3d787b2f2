"""`python -m ernievil2_train.embed`: end to end against the Paddle reference, plus error handling."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ernievil2_train import embed
from ernievil2_train.checkpoints import save_pretrained
from ernievil2_train.text import ErnieTokenizer
from tests.checkpoints.reference import convert_reference, load_npz
from tests.models.tiny import tiny_model

ATOL = 1e-5


def _run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def _parse(path: Path) -> list[tuple[np.ndarray, np.ndarray, str]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text, image, idx = line.split("\t")
        rows.append((np.array(text.split(), np.float32), np.array(image.split(), np.float32), idx))
    return rows


def _write_tsv(path: Path, rows: list[str]) -> Path:
    path.write_text("".join(f"{row}\n" for row in rows), encoding="utf-8")
    return path


def test_embeds_match_the_reference_and_evaluate(paddle_ref: Path, tmp_path: Path) -> None:
    ckpt = save_pretrained(
        convert_reference(paddle_ref), tmp_path / "ckpt", vocab_file=paddle_ref / "vocab.txt"
    )
    texts = [str(t) for t in load_npz(paddle_ref / "inputs.npz")["texts"]]
    image = base64.b64encode((paddle_ref / "landscape_640x427.jpg").read_bytes()).decode()
    good = [f"{text}\t{i}\t{image}" for i, text in enumerate(texts)]
    bad = ["only one column", f"two\t{image}", "bad image\t7\taGVsbG8=", "bad base64\t8\tabc"]
    tsv = _write_tsv(tmp_path / "pairs.tsv", [*good[:2], *bad, *good[2:]])
    out = tmp_path / "emb.txt"
    run = _run(
        "ernievil2_train.embed",
        "--checkpoint",
        ckpt,
        "--input",
        tsv,
        "--output",
        out,
        "--batch-size",
        "3",
        "--device",
        "cpu",
    )
    assert run.returncode == 0, run.stderr
    assert "wrote 4 row(s)" in run.stderr and "skipped 4 row(s)" in run.stderr
    assert "wrong column count: 2" in run.stderr and "undecodable image: 1" in run.stderr
    expected = load_npz(paddle_ref / "outputs.npz")
    rows = _parse(out)
    assert len(rows) == len(texts)
    for i, (text_vec, image_vec, idx) in enumerate(rows):
        assert idx == "1"
        np.testing.assert_allclose(text_vec, expected["text_pooled_norm"][i], atol=ATOL, rtol=0)
        np.testing.assert_allclose(image_vec, expected["image_embeds_norm"][2], atol=ATOL, rtol=0)
    evaluated = _run("ernievil2_train.evaluate", out)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "MeanRecall" in evaluated.stdout


def test_vectors_are_printed_like_numpy_float32() -> None:
    vector = np.array([0.1, -1e-5, 3.0, 0.123456789], np.float32)
    assert embed.format_vector(vector) == " ".join(str(np.float32(x)) for x in vector)
    assert embed.format_vector(vector.astype(np.float64)) == "0.1 -1e-05 3.0 0.12345679"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, paddle_ref: Path) -> Path:
    """A tiny model whose vocab fits the reference vocab.txt (checkpoint carries that vocab)."""
    vocab = paddle_ref / "vocab.txt"
    model = tiny_model(text={"vocab_size": ErnieTokenizer(vocab).vocab_size})
    return save_pretrained(model, tmp_path_factory.mktemp("tiny"), vocab_file=vocab)


def test_any_row_count_and_batch_size_independent(tiny_ckpt: Path, paddle_ref: Path, tmp_path: Path) -> None:
    images = [base64.b64encode(p.read_bytes()).decode() for p in sorted(paddle_ref.glob("*.jpg"))]
    tsv = _write_tsv(
        tmp_path / "p.tsv", [f"caption {i} 一张图片\t{i}\t{img}" for i, img in enumerate(images)]
    )
    outputs = []
    for batch_size in (1, 4):
        out = tmp_path / f"b{batch_size}.txt"
        args = ["--checkpoint", tiny_ckpt, "--input", tsv, "--output", out, "--batch-size", batch_size]
        assert embed.main([str(a) for a in args]) == 0
        outputs.append(_parse(out))
    assert len(outputs[0]) == len(images)
    for (t1, i1, _), (t2, i2, _) in zip(*outputs, strict=True):
        np.testing.assert_allclose(t1, t2, atol=1e-6)
        np.testing.assert_allclose(i1, i2, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(t1), 1.0, atol=1e-6)


def test_user_errors(
    tiny_ckpt: Path, paddle_ref: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tsv = _write_tsv(tmp_path / "p.tsv", ["a\t1\taGVsbG8="])
    vocab = paddle_ref / "vocab.txt"
    small_vocab_ckpt = save_pretrained(tiny_model(text={"vocab_size": 50}), tmp_path / "small")
    cases = [
        (["--checkpoint", tmp_path / "no", "--input", tsv, "--vocab", vocab], "checkpoint folder not found"),
        (["--checkpoint", small_vocab_ckpt, "--input", tsv, "--vocab", vocab], "vocab_size is 50"),
        (["--checkpoint", tiny_ckpt, "--input", tmp_path / "none.tsv"], "no such file"),
        (["--checkpoint", tiny_ckpt, "--input", tsv, "--vocab", tmp_path / "v.txt"], "no vocabulary"),
        (["--checkpoint", tiny_ckpt, "--input", tsv, "--batch-size", "0"], "must be positive"),
    ]
    for args, message in cases:
        argv = [str(a) for a in [*args, "--output", tmp_path / "o.txt"]]
        assert embed.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err
