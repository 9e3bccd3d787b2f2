"""`python -m ernievil2_train.similarity` on the converted reference checkpoint."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from ernievil2_train import similarity
from ernievil2_train.checkpoints import load_pretrained, save_pretrained
from ernievil2_train.text import ErnieTokenizer
from ernievil2_train.text.vocab import load_vocab
from ernievil2_train.vision import eval_transform
from tests.checkpoints.reference import (
    ATOL,
    RTOL,
    convert_reference,
    load_npz,
    preprocessed_rows,
    preprocessing_config,
    tokenizer_config,
)
from tests.models.tiny import tiny_model


@pytest.fixture(scope="module")
def ckpt(paddle_ref: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt")
    return save_pretrained(convert_reference(paddle_ref), out, vocab_file=paddle_ref / "vocab.txt")


def reference_images(ref: Path) -> list[Path]:
    """The reference image files, in the order of the preprocessing cases."""
    return [ref / case["file"] for case in json.loads((ref / "preprocess_cases.json").read_text())]


def test_matrix_matches_the_reference_embeddings(paddle_ref: Path, ckpt: Path) -> None:
    texts = [str(t) for t in load_npz(paddle_ref / "inputs.npz")["texts"]]
    row, name = next(iter(preprocessed_rows(paddle_ref).items()))
    image = paddle_ref / name
    max_len = tokenizer_config(paddle_ref)["max_text_seqlen"]
    tokenizer = ErnieTokenizer(paddle_ref / "vocab.txt", max_len=max_len)
    short_size = preprocessing_config(paddle_ref)["short_size"]
    model = load_pretrained(ckpt)
    transform = eval_transform(model.config.vision.image_size, short_size=short_size)
    probs, cosine = similarity.similarity(model, tokenizer, [image, image], texts, transform)
    out = {k: torch.from_numpy(v) for k, v in load_npz(paddle_ref / "outputs.npz").items()}
    want = out["image_embeds_norm"][row] @ out["text_pooled_norm"].T
    torch.testing.assert_close(cosine, torch.stack([want, want]), atol=ATOL, rtol=RTOL)
    want_probs = torch.softmax(out["logit_scale"].float() * want, dim=-1)
    torch.testing.assert_close(probs[0], want_probs, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))


def test_cli_prints_tables(paddle_ref: Path, ckpt: Path) -> None:
    images = reference_images(paddle_ref)[:2]
    cmd = [
        sys.executable,
        "-m",
        "ernievil2_train.similarity",
        "--checkpoint",
        str(ckpt),
        "--cosine",
        "--images",
        *map(str, images),
        "--texts",
        "一只猫",
        "a dog",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "probability" in run.stdout and "cosine similarity" in run.stdout
    assert all(p.name in run.stdout for p in images) and "一只猫" in run.stdout


def test_user_errors(
    ckpt: Path, paddle_ref: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    good = reference_images(paddle_ref)[0]
    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)
    cases = [
        ([good, pipe], f"--images: {pipe}: not regular files (pipes?); images are read from disk"),
        ([tmp_path / "missing.jpg"], "image file(s) not found"),
        ([tmp_path], f"--images: {tmp_path}: folder(s), not image files"),
        ([broken], f"{broken}: cannot decode image: not a recognised image (12 bytes)"),
        ([good, empty], f"{empty}: cannot decode image: no image data (0 bytes)"),
    ]
    for images, message in cases:
        argv = ["--checkpoint", str(ckpt), "--images", *map(str, images), "--texts", "x", "--device", "cpu"]
        assert similarity.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
        assert "BytesIO" not in err and " at 0x" not in err


def test_checkpoint_vocab_and_device_errors(
    ckpt: Path, paddle_ref: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = reference_images(paddle_ref)[0]
    max_id = max(load_vocab(paddle_ref / "vocab.txt").values())
    small_vocab = save_pretrained(tiny_model(text={"vocab_size": 50}), tmp_path / "small")
    gbk_vocab = tmp_path / "gbk.txt"
    gbk_vocab.write_bytes("[PAD]\n[CLS]\n[SEP]\n[UNK]\n猫狗\n".encode("gbk"))
    (tmp_path / "empty").mkdir()
    missing = tmp_path / "nope"
    cases = [
        (["--checkpoint", missing], f"{missing}: checkpoint folder not found"),
        (["--checkpoint", image], f"--checkpoint: {image} is a file, not a folder"),
        (["--checkpoint", tmp_path / "empty"], f"{tmp_path / 'empty'}: not a checkpoint folder (missing"),
        (["--checkpoint", ckpt, "--vocab", missing], f"--vocab {missing}: file not found"),
        (["--checkpoint", ckpt, "--vocab", gbk_vocab], str(gbk_vocab)),
        (["--checkpoint", small_vocab, "--vocab", paddle_ref / "vocab.txt"],
         f"ids go up to {max_id} but the model's text vocab_size is 50"),
        (["--checkpoint", small_vocab], f"no vocabulary: pass --vocab or put vocab.txt into {small_vocab}"),
        (["--checkpoint", ckpt, "--short-size", "0"], "error: --short-size: short_size 0 is smaller than"),
    ]
    for args, message in cases:
        argv = [*map(str, args), "--images", str(image), "--texts", "x", "--device", "cpu"]
        assert similarity.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
    argv = ["--checkpoint", str(ckpt), "--images", str(image), "--texts", "x", "--device", "gpu0"]
    assert similarity.main(argv) == 2
    assert capsys.readouterr().err.strip() == "error: --device 'gpu0': not a device (use cpu, cuda or cuda:N)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(ckpt: Path, paddle_ref: Path) -> None:
    cmd = [sys.executable, "-m", "ernievil2_train.similarity", "--checkpoint", str(ckpt), "--device", "cuda",
           "--images", str(reference_images(paddle_ref)[0]), "--texts", "x"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip() == "error: --device cuda requested but no CUDA device is available"


def test_captions_and_file_names_print_as_written_not_as_markup() -> None:
    """Square brackets in a caption or a file name are text: no markup error, nothing dropped."""
    texts, images = ["猫[/b]", "[red]狗"], [Path("[bold]a.jpg")]
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(similarity.render("scores", torch.zeros(1, 2), images, texts))
    shown = console.export_text()
    assert all(text in shown for text in texts) and "[bold]a.jpg" in shown
