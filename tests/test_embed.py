"""`python -m ernievil2_train.embed`: end to end against the Paddle reference, plus error handling."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ernievil2_train import embed
from ernievil2_train.checkpoints import save_pretrained
from ernievil2_train.evaluate import format_table
from ernievil2_train.metrics.retrieval import ernie_protocol
from ernievil2_train.text import ErnieTokenizer
from tests.checkpoints.reference import (
    ATOL,
    RTOL,
    load_npz,
    preprocessed_rows,
    preprocessing_config,
    reference_heads,
    tokenizer_config,
)
from tests.conftest import with_ctrl_c
from tests.models.tiny import tiny_model


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


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def any_image(paddle_ref: Path) -> Path:
    """One of the reference image files (any decodable image will do)."""
    cases = json.loads((paddle_ref / "preprocess_cases.json").read_text())
    return paddle_ref / cases[0]["file"]


def test_convert_embed_evaluate_match_the_reference(paddle_ref: Path, tmp_path: Path) -> None:
    """The three CLIs chained: official checkpoint -> embeddings file -> retrieval table."""
    vision_heads, text_heads = reference_heads(paddle_ref)
    ckpt = tmp_path / "ckpt"
    converted = _run("ernievil2_train.convert", paddle_ref / "model.pdparams", ckpt, "--vision-heads",
                     vision_heads, "--text-heads", text_heads, "--vocab", paddle_ref / "vocab.txt")
    assert converted.returncode == 0, converted.stderr
    texts = [str(t) for t in load_npz(paddle_ref / "inputs.npz")["texts"]]
    image_rows = sorted(preprocessed_rows(paddle_ref).items())
    assert image_rows
    pairs = [(i, *image_rows[i % len(image_rows)]) for i in range(len(texts))]
    good = [f"{texts[i]}\t{i}\t{_b64(paddle_ref / name)}" for i, _, name in pairs]
    image = _b64(paddle_ref / image_rows[0][1])
    bad = ["only one column", f"two\t{image}", "bad image\t7\taGVsbG8=", "bad base64\t8\tabc"]
    tsv = _write_tsv(tmp_path / "pairs.tsv", [*good[:2], *bad, *good[2:]])
    out = tmp_path / "emb.txt"
    max_len = tokenizer_config(paddle_ref)["max_text_seqlen"]
    short_size = preprocessing_config(paddle_ref)["short_size"]
    run = _run("ernievil2_train.embed", "--checkpoint", ckpt, "--input", tsv, "--output", out,
               "--batch-size", "3", "--device", "cpu", "--max-len", max_len, "--short-size", short_size)
    assert run.returncode == 0, run.stderr
    assert f"wrote {len(texts)} row(s)" in run.stderr and "skipped 4 row(s)" in run.stderr
    assert "wrong column count: 2" in run.stderr and "undecodable image: 1" in run.stderr
    expected = load_npz(paddle_ref / "outputs.npz")
    rows = _parse(out)
    assert len(rows) == len(texts)
    for (text_vec, image_vec, idx), (i, row, _) in zip(rows, pairs, strict=True):
        assert idx == "1"
        np.testing.assert_allclose(text_vec, expected["text_pooled_norm"][i], atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(image_vec, expected["image_embeds_norm"][row], atol=ATOL, rtol=RTOL)
    evaluated = _run("ernievil2_train.evaluate", out, "--device", "cpu")
    assert evaluated.returncode == 0, evaluated.stderr
    text_vecs, image_vecs = (np.stack([r[k] for r in rows]) for k in (0, 1))
    assert evaluated.stdout == format_table(ernie_protocol(text_vecs, image_vecs, device="cpu"))


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
    cases = json.loads((paddle_ref / "preprocess_cases.json").read_text())
    images = [_b64(paddle_ref / case["file"]) for case in cases]
    tsv = _write_tsv(
        tmp_path / "p.tsv", [f"caption {i} 一张图片\t{i}\t{img}" for i, img in enumerate(images)]
    )
    outputs = []
    for batch_size in (1, 4):
        out = tmp_path / f"b{batch_size}.txt"
        args = ["--checkpoint", tiny_ckpt, "--input", tsv, "--output", out, "--batch-size", batch_size,
                "--max-len", 16]
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
    gbk_vocab = tmp_path / "gbk.txt"
    gbk_vocab.write_bytes("[PAD]\n[CLS]\n[SEP]\n[UNK]\n猫狗\n".encode("gbk"))
    (tmp_path / "empty_ckpt").mkdir()
    folder = tmp_path / "folder"
    folder.mkdir()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    missing = tmp_path / "no"
    not_found = f"{missing}: checkpoint folder not found"
    cases = [
        (["--checkpoint", missing, "--input", tsv, "--vocab", vocab], not_found),
        (["--checkpoint", missing, "--input", tsv], not_found),
        (["--checkpoint", tsv, "--input", tsv], f"--checkpoint: {tsv} is a file, not a folder"),
        (["--checkpoint", tmp_path / "empty_ckpt", "--input", tsv], "not a checkpoint folder (missing"),
        (["--checkpoint", small_vocab_ckpt, "--input", tsv, "--vocab", vocab], "vocab_size is 50"),
        (["--checkpoint", tiny_ckpt, "--input", tmp_path / "none.tsv"], "no such file"),
        (["--checkpoint", tiny_ckpt, "--input", fifo], f"--input {fifo}: not a regular file (a pipe?)"),
        (["--checkpoint", tiny_ckpt, "--input", folder], f"--input {folder}: is a folder, not a file"),
        (["--checkpoint", tiny_ckpt, "--input", tsv, "--vocab", missing], f"--vocab {missing}: file not"),
        (["--checkpoint", tiny_ckpt, "--input", tsv, "--vocab", gbk_vocab], f"{gbk_vocab}"),
        (["--checkpoint", tiny_ckpt, "--input", tsv, "--batch-size", "0"],
         "--batch-size must be positive, got 0"),
        (["--checkpoint", tiny_ckpt, "--input", tsv, "--workers", "-1"],
         "--workers must be positive, got -1"),
        (["--checkpoint", tiny_ckpt, "--input", tsv, "--max-len", "64"],
         "--max-len 64: must be between 2 and the checkpoint's 16 text positions (max_position_embeddings)"),
        (["--checkpoint", tiny_ckpt, "--input", tsv, "--short-size", "8", "--max-len", "16"],
         "--short-size: short_size 8 is smaller than the crop size"),
        (["--checkpoint", tiny_ckpt, "--input", tsv, "--output", folder], f"--output {folder}: is a folder"),
        (["--checkpoint", tiny_ckpt, "--input", tsv, "--output", missing / "o.txt"],
         f"--output {missing / 'o.txt'}: folder {missing} does not exist"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--checkpoint", tiny_ckpt, "--input", tsv, "--device", "cuda"],
                      "--device cuda requested but no CUDA device is available"))
    for args, message in cases:
        argv = [str(a) for a in args]
        if "--output" not in argv:
            argv += ["--output", str(tmp_path / "o.txt")]
        assert embed.main(argv) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, (args, err)
        assert "put vocab.txt" not in err
    assert not (tmp_path / "o.txt").exists()


def _last_error(run: subprocess.CompletedProcess) -> str:
    """The one-line error a failed CLI run ends with (a progress bar may come before it)."""
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


def test_output_may_not_be_the_input(
    tiny_ckpt: Path, any_image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _b64(any_image)
    tsv = _write_tsv(tmp_path / "p.tsv", [f"一只猫\t0\t{image}"])
    before = tsv.read_bytes()
    (tmp_path / "sub").mkdir()
    other_spelling = tmp_path / "sub" / ".." / "p.tsv"
    run = _run("ernievil2_train.embed", "--checkpoint", tiny_ckpt, "--input", tsv, "--output", other_spelling,
               "--device", "cpu", "--max-len", "16")
    assert _last_error(run) == run.stderr.strip()
    assert run.stderr.strip() == (
        f"error: --output {other_spelling} is the same file as --input {tsv} (it would be overwritten)"
    )
    argv = ["--checkpoint", tiny_ckpt, "--input", tsv, "--output", tsv, "--max-len", "16"]
    assert embed.main([str(a) for a in argv]) == 2
    assert "is the same file as --input" in capsys.readouterr().err
    assert tsv.read_bytes() == before


def test_output_may_not_be_a_file_of_the_checkpoint(
    tiny_ckpt: Path, any_image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tsv = _write_tsv(tmp_path / "p.tsv", [f"一只猫\t0\t{_b64(any_image)}"])
    before = {file.name: file.read_bytes() for file in tiny_ckpt.iterdir()}
    vocab = tmp_path / "vocab.txt"
    vocab.write_bytes(before["vocab.txt"])
    targets = [(tiny_ckpt / "model.safetensors", "--checkpoint"), (tiny_ckpt / "vocab.txt", "--checkpoint"),
               (vocab, "--vocab")]
    for target, flag in targets:
        argv = ["--checkpoint", tiny_ckpt, "--input", tsv, "--output", target, "--vocab", vocab,
                "--max-len", "16"]
        assert embed.main([str(a) for a in argv]) == 2
        assert capsys.readouterr().err.strip() == (
            f"error: --output {target} is the same file as {flag} {target} (it would be overwritten)"
        )
    assert {file.name: file.read_bytes() for file in tiny_ckpt.iterdir()} == before


def test_a_failed_write_names_the_output_and_leaves_nothing(
    tiny_ckpt: Path, any_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A full disk: the error names --output (not the input), the earlier output stays, no temporary file."""
    tsv = _write_tsv(tmp_path / "p.tsv", [f"一只猫\t0\t{_b64(any_image)}"])
    out = tmp_path / "emb.txt"
    out.write_text("previous run\n", encoding="utf-8")

    class FullDisk(io.StringIO):
        def writelines(self, lines) -> None:
            raise OSError(28, "No space left on device")

    real_open = Path.open

    def open_(self: Path, mode: str = "r", *args, **kwargs):
        if self.name.endswith(".tmp"):  # the temporary output: made, then every write fails
            real_open(self, mode, *args, **kwargs).close()
            return FullDisk()
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    argv = ["--checkpoint", tiny_ckpt, "--input", tsv, "--output", out, "--max-len", "16"]
    assert embed.main([str(a) for a in argv]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --output {out}: cannot write (No space left on device)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.txt", "p.tsv"]
    assert out.read_text(encoding="utf-8") == "previous run\n"


def test_a_row_of_empty_columns_is_counted_not_dropped(
    tiny_ckpt: Path, any_image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tsv = _write_tsv(tmp_path / "p.tsv", [f"一只猫\t0\t{_b64(any_image)}", "\t\t", "", "   "])
    argv = ["--checkpoint", tiny_ckpt, "--input", tsv, "--output", tmp_path / "o.txt", "--max-len", "16"]
    assert embed.main([str(a) for a in argv]) == 0
    assert "skipped 1 row(s) [undecodable image: 1]" in capsys.readouterr().err


@pytest.mark.parametrize(("signal_number", "status", "line"), [
    (signal.SIGINT, 130, "python -m ernievil2_train.embed: interrupted"),
    (signal.SIGTERM, 143, "python -m ernievil2_train.embed: stopped by SIGTERM"),
])
def test_an_interrupted_run_ends_with_one_line_and_keeps_the_old_output(
    tiny_ckpt: Path, any_image: Path, tmp_path: Path, signal_number: int, status: int, line: str
) -> None:
    tsv = _write_tsv(tmp_path / "p.tsv", [f"一只猫 {i}\t{i}\t{_b64(any_image)}" for i in range(3000)])
    out = tmp_path / "emb.txt"
    out.write_text("previous run\n", encoding="utf-8")
    argv = [sys.executable, "-m", "ernievil2_train.embed", "--checkpoint", str(tiny_ckpt),
            "--input", str(tsv), "--output", str(out), "--max-len", "16", "--batch-size", "2",
            "--workers", "1"]
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, preexec_fn=with_ctrl_c)
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".tmp") and p.stat().st_size for p in tmp_path.iterdir()):
        assert process.poll() is None and time.monotonic() < deadline, "no row was written"
        time.sleep(0.05)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == status, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.txt", "p.tsv"]
    assert out.read_text(encoding="utf-8") == "previous run\n"


def test_nothing_embedded_is_an_error_and_keeps_the_old_output(
    tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "emb.txt"
    out.write_text("previous run\n", encoding="utf-8")
    bad = _write_tsv(tmp_path / "bad.tsv", ["one column", "bad image\t1\taGVsbG8="])
    run = _run("ernievil2_train.embed", "--checkpoint", tiny_ckpt, "--input", bad, "--output", out,
               "--device", "cpu", "--max-len", "16")
    err = _last_error(run)
    assert err.startswith(f"error: --input {bad}: nothing written to --output (no row could be embedded; ")
    assert "skipped 2 row(s) [wrong column count: 1, undecodable image: 1]" in err
    assert out.read_text(encoding="utf-8") == "previous run\n"
    empty = _write_tsv(tmp_path / "empty.tsv", [])
    fresh = tmp_path / "fresh.txt"
    for target in (out, fresh):
        argv = ["--checkpoint", tiny_ckpt, "--input", empty, "--output", target, "--max-len", "16"]
        assert embed.main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == f"error: --input {empty}: nothing written to --output (no rows in it)"
    assert out.read_text(encoding="utf-8") == "previous run\n" and not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tsv", "emb.txt", "empty.tsv"]


def test_undecodable_images_are_reported_without_object_reprs(
    tiny_ckpt: Path, any_image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _b64(any_image)
    tsv = _write_tsv(tmp_path / "p.tsv", [f"一只猫\t0\t{image}", "empty image\t1\t", "garbage\t2\taGVsbG8="])
    out = tmp_path / "emb.txt"
    argv = ["--checkpoint", tiny_ckpt, "--input", tsv, "--output", out, "--max-len", "16"]
    assert embed.main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err
    summary = err.strip().splitlines()[-1]
    assert summary.startswith("skipped 2 row(s) [undecodable image: 2]")
    assert "line 2: undecodable image (no image data (0 bytes))" in summary
    assert "line 3: undecodable image (not a recognised image (5 bytes))" in summary
    assert "BytesIO" not in err and " at 0x" not in err
    assert len(_parse(out)) == 1


def test_too_large_and_corrupt_images_are_told_only_in_the_summary(
    tiny_ckpt: Path, any_image: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """An image over the pixel limit is skipped as too large, without PIL's warning about it; a corrupt TIFF
    as undecodable, without OpenCV's own warning and error lines (written to the process's stderr)."""
    huge = io.BytesIO()
    Image.new("1", (10_000, 9_000)).save(huge, "PNG")
    tiff = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tiff, "TIFF")
    broken = tiff.getvalue()[:1000]  # its header whole, its pixels cut
    rows = [f"一只猫\t0\t{_b64(any_image)}", f"big\t1\t{base64.b64encode(huge.getvalue()).decode()}",
            f"tiff\t2\t{base64.b64encode(bytes(broken)).decode()}"]
    tsv = _write_tsv(tmp_path / "p.tsv", rows)
    argv = ["--checkpoint", tiny_ckpt, "--input", tsv, "--output", tmp_path / "emb.txt", "--max-len", "16"]
    assert embed.main([str(a) for a in argv]) == 0
    err = capfd.readouterr().err
    summary = err.strip().splitlines()[-1]
    assert summary.startswith("skipped 2 row(s) [image too large: 1, undecodable image: 1]")
    assert "line 2: image too large (image of 10000x9000 pixels exceeds the limit of " in summary
    assert "line 3: undecodable image (OpenCV could not decode the image (1000 bytes))" in summary
    assert "Warning" not in err and "[ERROR" not in err and "[ WARN" not in err, err


def test_a_symlinked_output_writes_the_file_it_names_and_stays_a_link(
    tiny_ckpt: Path, any_image: Path, tmp_path: Path
) -> None:
    tsv = _write_tsv(tmp_path / "p.tsv", [f"一只猫\t0\t{_b64(any_image)}"])
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "emb.txt"
    target.write_text("previous run\n", encoding="utf-8")
    link = tmp_path / "latest.txt"
    link.symlink_to(target)
    dangling = tmp_path / "dangling.txt"
    dangling.symlink_to(tmp_path / "store" / "new.txt")
    for out in (link, dangling):
        argv = ["--checkpoint", tiny_ckpt, "--input", tsv, "--output", out, "--max-len", "16"]
        assert embed.main([str(a) for a in argv]) == 0
        assert out.is_symlink() and len(_parse(out)) == 1
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["emb.txt", "new.txt"]


def test_a_replaced_output_keeps_its_permissions(tiny_ckpt: Path, any_image: Path, tmp_path: Path) -> None:
    """The rows are written beside the output and moved over it: a private file stays private."""
    tsv = _write_tsv(tmp_path / "p.tsv", [f"一只猫\t0\t{_b64(any_image)}"])
    out, new = tmp_path / "emb.txt", tmp_path / "new.txt"
    out.write_text("previous run\n", encoding="utf-8")
    out.chmod(0o600)
    for path in (out, new):
        argv = ["--checkpoint", tiny_ckpt, "--input", tsv, "--output", path, "--max-len", "16"]
        assert embed.main([str(a) for a in argv]) == 0
    assert len(_parse(out)) == 1 and out.stat().st_mode & 0o777 == 0o600
    umask = os.umask(0)
    os.umask(umask)
    assert new.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_read_only_output_is_refused_and_kept(
    tiny_ckpt: Path, any_image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tsv = _write_tsv(tmp_path / "p.tsv", [f"一只猫\t0\t{_b64(any_image)}"])
    out = tmp_path / "emb.txt"
    out.write_text("previous run\n", encoding="utf-8")
    out.chmod(0o444)
    argv = ["--checkpoint", tiny_ckpt, "--input", tsv, "--output", out, "--max-len", "16"]
    assert embed.main([str(a) for a in argv]) == 2
    assert capsys.readouterr().err.strip() == f"error: --output {out}: is read-only"
    assert out.read_text(encoding="utf-8") == "previous run\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.txt", "p.tsv"]


def test_an_output_that_is_not_a_regular_file_is_written_not_replaced(
    tiny_ckpt: Path, any_image: Path, tmp_path: Path
) -> None:
    """`--output /dev/null` (a character device) or a named pipe: written to as they are."""
    tsv = _write_tsv(tmp_path / "p.tsv", [f"一只猫\t0\t{_b64(any_image)}"])
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    reader = subprocess.Popen(["cat", str(pipe)], stdout=subprocess.PIPE, text=True)
    try:
        argv = ["--checkpoint", tiny_ckpt, "--input", tsv, "--output", pipe, "--max-len", "16"]
        assert embed.main([str(a) for a in argv]) == 0
        rows, _ = reader.communicate(timeout=60)
    finally:
        reader.kill()
    assert len(rows.splitlines()) == 1 and rows.endswith("\t1\n")
    assert pipe.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["p.tsv", "pipe"]
    null = Path(os.devnull)
    argv = ["--checkpoint", tiny_ckpt, "--input", tsv, "--output", null, "--max-len", "16"]
    assert embed.main([str(a) for a in argv]) == 0
    assert null.is_char_device()


def test_the_skip_summary_lists_the_first_lines_in_order() -> None:
    """A batch's undecodable images are found after the malformed lines read with it."""
    skipped = embed.Skipped()
    for line_no in (4, 2, *range(30, 18, -1), 3):
        skipped.add(line_no, "undecodable image" if line_no % 2 else "not UTF-8")
    first = skipped.summary().split("; first: ")[1].split("; ")
    assert first == [f"line {n}: {'undecodable image' if n % 2 else 'not UTF-8'}"
                     for n in (2, 3, 4, *range(19, 26))]
