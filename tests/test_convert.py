"""`python -m ernievil2_train.convert` as a real subprocess."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ernievil2_train import convert
from ernievil2_train.checkpoints import find_vocab, load_pretrained
from tests.checkpoints.reference import ATOL, PDPARAMS_FILES, RTOL, load_npz, reference_heads


def _convert(*args: str | Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ernievil2_train.convert", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", PDPARAMS_FILES)
def test_converts_the_reference_checkpoint(paddle_ref: Path, tmp_path: Path, name: str) -> None:
    vision_heads, text_heads = reference_heads(paddle_ref)
    out = tmp_path / "ckpt"
    run = _convert(
        paddle_ref / name,
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
    inputs, outputs = load_npz(paddle_ref / "inputs.npz"), load_npz(paddle_ref / "outputs.npz")
    with torch.no_grad():
        pooled = model.encode_text(torch.from_numpy(inputs["input_ids"]))
        image = model.encode_image(torch.from_numpy(inputs["pixel_values"]))
    torch.testing.assert_close(pooled, torch.from_numpy(outputs["text_pooled"]), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(image, torch.from_numpy(outputs["image_embeds"]), atol=ATOL, rtol=RTOL)
    assert model.logit_scale.item() == float(outputs["temperature_b"])


def test_heads_the_flags_leave_out_are_called_a_guess(
    paddle_ref: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The weights do not hold the head counts: the summary says which ones were guessed; the release's ERNIE
    config gives the text tower's."""
    ernie = tmp_path / "ernie_config.json"
    ernie.write_text(json.dumps(json.loads((paddle_ref / "config.json").read_text())["text"]))
    vision_heads, text_heads = reference_heads(paddle_ref)
    src = paddle_ref / "model.pdparams"
    assert convert.main([str(src), str(tmp_path / "a"), "--text-config", str(ernie)]) == 0
    vision, text = capsys.readouterr().out.splitlines()[:2]
    assert "heads (a guess: the weights do not hold it; --vision-heads sets it)" in vision
    assert f"{text_heads} heads, ffn" in text
    assert convert.main([str(src), str(tmp_path / "b"), "--vision-heads", str(vision_heads)]) == 0
    vision, text = capsys.readouterr().out.splitlines()[:2]
    assert f"{vision_heads} heads" in vision and "guess" not in vision
    assert "heads (a guess: the weights do not hold it; --text-heads or --text-config sets it)" in text


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
    width = json.loads((paddle_ref / "config.json").read_text())["text"]["hidden_size"]
    err = _main_error(capsys, paddle_ref / "model.pdparams", tmp_path / "e", "--text-heads", str(width + 1))
    assert f"not divisible by {width + 1} heads" in err


def test_unwritable_output_is_one_line(
    paddle_ref: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = tmp_path / "a_file"
    existing.write_text("keep me")
    err = _main_error(capsys, paddle_ref / "model.pdparams", existing)
    assert err == f"error: {existing}: is a file, not a folder; choose a folder for the checkpoint"
    assert existing.read_text() == "keep me"
    err = _main_error(capsys, paddle_ref / "model.pdparams", existing / "sub")
    assert err.startswith(f"error: {existing / 'sub'}: cannot write the checkpoint folder (")


def test_output_equal_to_the_input_is_refused(
    paddle_ref: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "model.pdparams"
    src.write_bytes((paddle_ref / "model.pdparams").read_bytes())
    assert "the output folder is the input file" in _main_error(capsys, src, src)
    assert src.read_bytes() == (paddle_ref / "model.pdparams").read_bytes()


def test_bad_vocabularies_are_refused_before_writing(
    paddle_ref: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vocab_size = json.loads((paddle_ref / "config.json").read_text())["text"]["vocab_size"]
    garbage = tmp_path / "garbage.txt"
    garbage.write_bytes(bytes(range(128, 256)) * 8)
    too_big = tmp_path / "big.txt"
    too_big.write_text(f"[PAD]\t0\n[CLS]\t1\n[SEP]\t2\n[UNK]\t{vocab_size}\n", encoding="utf-8")
    out = tmp_path / "out"
    src = paddle_ref / "model.pdparams"
    for vocab, match in [
        (garbage, "UTF-8"),
        (too_big, f"ids go up to {vocab_size} but the model's text vocab_size is {vocab_size}"),
        (tmp_path / "nope.txt", "vocabulary file not found"),
    ]:
        err = _main_error(capsys, src, out, "--vocab", vocab)
        assert match in err and str(vocab) in err
        assert not out.exists()


@pytest.mark.parametrize("heads", ["0", "-2", "two"])
def test_heads_must_be_positive(
    paddle_ref: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], heads: str
) -> None:
    for option in ("--vision-heads", "--text-heads"):
        with pytest.raises(SystemExit) as exit_info:
            convert.main([str(paddle_ref / "model.pdparams"), str(tmp_path / "o"), option, heads])
        assert exit_info.value.code == 2
        assert f"argument {option}: must be a positive integer, got '{heads}'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_source_errors_name_the_file_once(
    paddle_ref: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _main_error(capsys, tmp_path, tmp_path / "a")
    assert err == f"error: {tmp_path}: is a folder, not a .pdparams file"
    zipped = tmp_path / "torch.pdparams"
    torch.save({"w": torch.zeros(2)}, zipped)
    err = _main_error(capsys, zipped, tmp_path / "b")
    assert err == f"error: {zipped}: a torch/zip file, not a Paddle .pdparams pickle"
    with (paddle_ref / "model.pdparams").open("rb") as f:
        arrays = pickle.load(f)
    del arrays["text_model.encoder_stack.block.0.ffn.i.weight"]
    missing = tmp_path / "missing.pdparams"
    missing.write_bytes(pickle.dumps(arrays, protocol=4))
    err = _main_error(capsys, missing, tmp_path / "c")
    assert err.count(str(missing)) == 1 and "missing key text_model.encoder_stack.block.0.ffn.i.weight" in err
    assert not any((tmp_path / name).exists() for name in "abc")


def test_a_reconversion_keeps_the_folders_own_vocab_and_removes_another_models(
    paddle_ref: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, src = tmp_path / "ckpt", paddle_ref / PDPARAMS_FILES[0]
    heads = [str(h) for h in reference_heads(paddle_ref)]
    args = [str(src), str(out), "--vision-heads", heads[0], "--text-heads", heads[1]]
    assert convert.main([*args, "--vocab", str(paddle_ref / "vocab.txt")]) == 0
    assert convert.main(args) == 0  # the same weights again, without --vocab
    assert capsys.readouterr().out.endswith("(kept its vocab.txt)\n")
    assert find_vocab(out).read_bytes() == (paddle_ref / "vocab.txt").read_bytes()
    tokens = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]", *(f"tok{i}" for i in range(46))]
    find_vocab(out).write_text("".join(f"{t}\t{i}\n" for i, t in enumerate(tokens)))  # fewer than its rows
    assert convert.main(args) == 0  # saved beside a model of this table size: the folder's own
    assert capsys.readouterr().out.endswith("(kept its vocab.txt)\n")
    config = json.loads((out / "config.json").read_text())
    size = config["text"]["vocab_size"]
    config["text"]["vocab_size"] = 51
    (out / "config.json").write_text(json.dumps(config))  # the folder held a small model with its vocab
    assert convert.main(args) == 0
    assert capsys.readouterr().out.endswith(
        f"(removed the vocab.txt it held: it came with a model of 51 text embeddings, this one has {size}, "
        "another model's; copy this one's in with --vocab)\n")
    assert find_vocab(out) is None
