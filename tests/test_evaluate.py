"""The evaluate CLI: official table and numbers on the fixture files, JSON output, feature files, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from ernievil2_train.checkpoints import save_pretrained
from ernievil2_train.data.evalset import load_evalset
from ernievil2_train.evaluate import format_table, main
from ernievil2_train.metrics.retrieval import any_positive, ernie_protocol
from ernievil2_train.text import ErnieTokenizer, load_vocab
from ernievil2_train.vision import eval_transform
from tests.metrics.evalset_helpers import MAX_LEN, TINY, tiny_checkpoint, write_evalset


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ernievil2_train.evaluate", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def write_embeddings(path: Path, text: np.ndarray, image: np.ndarray) -> Path:
    with path.open("w") as fh:
        for t, i in zip(text, image, strict=True):
            fh.write(" ".join(str(x) for x in t) + "\t" + " ".join(str(x) for x in i) + "\t1\n")
    return path


def load_cases(paddle_ref: Path) -> list[dict]:
    return json.loads((paddle_ref / "eval_cases.json").read_text())


def test_cli_prints_official_table_verbatim(paddle_ref):
    for case in load_cases(paddle_ref):
        result = cli(paddle_ref / case["file"])
        assert result.returncode == 0, result.stderr
        assert result.stdout == case["table"]


def test_json_has_official_numbers(paddle_ref, capsys):
    for case in load_cases(paddle_ref):
        assert main([str(paddle_ref / case["file"]), "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        rows = len((paddle_ref / case["file"]).read_text().splitlines())
        assert out["protocol"] == "ernie" and out["num_texts"] == out["num_images"] == rows
        assert case.get("n", rows) == rows
        for direction in ("t2i", "i2t"):
            keys = ["r@1", "r@5", "r@10", "mean_recall", "mrr"]
            assert [out[f"{direction}/{k}"] for k in keys] == case[direction]
        assert out["mean_recall"] == case["mean"][3]


def test_table_mean_row_is_average_of_directions(paddle_ref, capsys):
    case = load_cases(paddle_ref)[0]
    assert main([str(paddle_ref / case["file"])]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.split("|")[2:6] == [f" {v * 100:.2f} ".rjust(len(c)) for v, c in
                                    zip(case["mean"][:4], last.split("|")[2:6], strict=True)]


def test_any_row_count_and_exact_parsing(tmp_path, capsys):
    rng = np.random.default_rng(0)
    text = rng.standard_normal((13, 5)).astype(np.float32)
    image = (text + rng.standard_normal((13, 5))).astype(np.float32)
    path = write_embeddings(tmp_path / "e.txt", text, image)
    assert main([str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = ernie_protocol(text, image, device="cpu")
    assert {k: out[k] for k in expected} == expected


def noisy_pairs(path: Path, rows: int, seed: int) -> Path:
    """An embeddings file of `rows` random text vectors, each paired with a noisy copy as its image."""
    rng = np.random.default_rng(seed)
    text = rng.standard_normal((rows, 4)).astype(np.float32)
    return write_embeddings(path, text, text + rng.standard_normal((rows, 4)).astype(np.float32))


def test_an_embeddings_file_read_from_a_pipe(tmp_path, capsys):
    path = noisy_pairs(tmp_path / "e.txt", 7, seed=3)
    assert main([str(path), "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(path.read_bytes()))
    writer.start()
    assert main([str(fifo), "--json"]) == 0
    writer.join()
    assert json.loads(capsys.readouterr().out) == from_file


def test_an_embeddings_file_with_a_byte_order_mark(tmp_path, capsys):
    path = noisy_pairs(tmp_path / "e.txt", 6, seed=2)
    assert main([str(path), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert main([str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == plain


def test_any_positive_on_embeddings_file_pools_identical_vectors(tmp_path, capsys):
    rng = np.random.default_rng(1)
    images = rng.standard_normal((4, 6)).astype(np.float32)
    texts = rng.standard_normal((10, 6)).astype(np.float32)
    rows = [0, 0, 1, 2, 2, 2, 3, 3, 1, 0]  # each image repeated once per caption, as run_infer writes it
    path = write_embeddings(tmp_path / "e.txt", texts, images[rows])
    assert main([str(path), "--protocol", "any_positive", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["num_texts"], out["num_images"]) == (10, 4)  # the distinct texts and images ranked
    expected = any_positive(texts, images, [[r] for r in rows], device="cpu")
    assert {k: out[k] for k in expected} == expected


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def feature_files(tmp_path: Path) -> tuple[Path, Path, Path, dict]:
    rng = np.random.default_rng(2)
    image = rng.standard_normal((6, 8)).astype(np.float32)
    text = rng.standard_normal((9, 8)).astype(np.float32)
    gt = [[0, 1], [1], [2], [3], [3, 4], [4], [0], [5], [2, 5]]
    img_ids = [1000 + i for i in range(6)]
    imgs = write_jsonl(tmp_path / "valid_imgs.img_feat.jsonl",
                       [{"image_id": i, "feature": v.tolist()} for i, v in zip(img_ids, image, strict=True)])
    order = [8, 3, 0, 1, 2, 4, 5, 6, 7]  # feature file order differs from the texts file
    txts = write_jsonl(tmp_path / "valid_texts.txt_feat.jsonl",
                       [{"text_id": t, "feature": text[t].tolist()} for t in order])
    gt_file = write_jsonl(tmp_path / "valid_texts.jsonl",
                          [{"text_id": t, "text": f"t{t}", "image_ids": [img_ids[i] for i in pos]}
                           for t, pos in enumerate(gt)])
    return imgs, txts, gt_file, any_positive(text, image, gt, device="cpu")


def test_feature_files_any_positive(tmp_path, capsys):
    imgs, txts, gt_file, expected = feature_files(tmp_path)
    argv = ["--image-feats", str(imgs), "--text-feats", str(txts), "--texts", str(gt_file)]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["protocol"] == "any_positive" and out["num_texts"] == 9 and out["num_images"] == 6
    assert {k: out[k] for k in expected} == expected
    assert main(argv) == 0
    assert capsys.readouterr().out == format_table(expected)


def run_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "empty file"),
        ("1 2\t3 4\n1 2\t3 4\t1\n", ":1: expected 3 tab-separated fields"),
        ("1 2\t3 4\t1\n1 2 5\t3 4\t1\n", ":2: text vector (column 1) has 3 values, line 1 has 2"),
        ("1 2\t3 4\t1\n1 2\t3 x\t1\n", ":2: image vector (column 2): 'x' is not a number"),
        ("1 2\t3 4 5\t1\n", "text vectors have 2 values, image vectors 3"),
        ("1 2\t3 4\t1\n1 nan\t3 4\t1\n", ":2: text vector (column 1) has NaN or infinite values"),
        ("1 2\t3 inf\t1\n1 2\t3 4\t1\n", ":1: image vector (column 2) has NaN or infinite values"),
        ("1 2\t3 4\t1\n0 0\t3 4\t1\n", ":2: text vector (column 1) is all zeros (not an embedding)"),
        ("1 2\t0.0 -0.0\t1\n", ":1: image vector (column 2) is all zeros (not an embedding)"),
        ("1 2\t3 4\t1\n0 0\t3 4\t1\n1 nan\t3 4\t1\n", ":2: text vector (column 1) is all zeros"),
        ("1 2\t3 4\t1\n1 inf\t3 4\t1\n0 0\t3 4\t1\n", ":2: text vector (column 1) has NaN or infinite"),
        ("1 2\t3 4\t1\n3e-31 4e-31\t3 4\t1\n", ":2: text vector (column 1) has length 5e-31, beyond what"),
        ("1 2\t3e30 4e30\t1\n", ":1: image vector (column 2) has length 5e+30, beyond what float32 scores"),
    ],
)
def test_embeddings_file_errors(tmp_path, capsys, content, match):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    err = run_error(capsys, [str(path)])
    assert match in err and str(path) in err


def test_missing_file_and_usage_errors(tmp_path, capsys):
    assert "no such file" in run_error(capsys, [str(tmp_path / "nope.txt")])
    assert run_error(capsys, [str(tmp_path)]).endswith(f"error: {tmp_path}: is a folder, not a file")
    imgs, txts, gt_file, _ = feature_files(tmp_path)
    for argv, match in [
        ([], "exactly one input"),
        (["--image-feats", str(imgs)], "needs all of"),
        (["--image-feats", str(imgs), "--text-feats", str(txts), "--texts", str(gt_file),
          "--protocol", "ernie"], "row-paired"),
        (["--checkpoint", str(tmp_path)], "both --checkpoint and --eval-set"),
        ([str(imgs), "--split", "test"], "--split is for encoding (--checkpoint/--eval-set); embeddings are "
                                         "encoded already"),
        ([str(imgs), "--bf16"], "--bf16 is for encoding"),
        ([str(imgs), "--split", "valid"], "--split is for encoding"),  # the default value, but given
        ([str(imgs), "--batch-size=64"], "--batch-size is for encoding"),
        (["--image-feats", str(imgs), "--text-feats", str(txts), "--texts", str(gt_file), "--max-len", "9"],
         "--max-len is for encoding (--checkpoint/--eval-set); features are encoded already"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert match in capsys.readouterr().err


def test_feature_file_errors(tmp_path, capsys):
    imgs, txts, gt_file, _ = feature_files(tmp_path)
    base = ["--image-feats", str(imgs), "--text-feats", str(txts), "--texts", str(gt_file)]
    wide = write_jsonl(tmp_path / "wide.jsonl", [{"image_id": 1000, "feature": [0.0] * 9}])
    err = run_error(capsys, ["--image-feats", str(wide), *base[2:]])
    assert "dimension mismatch" in err and str(wide) in err and str(txts) in err
    unknown = write_jsonl(tmp_path / "gt.jsonl", [{"text_id": 0, "text": "a", "image_ids": [77]}])
    err = run_error(capsys, [*base[:4], "--texts", str(unknown)])
    assert f"{unknown}:1: image id 77 has no feature" in err
    missing_text = write_jsonl(tmp_path / "gt2.jsonl", [{"text_id": 99, "text": "a", "image_ids": [1000]}])
    assert "text_id '99' has no feature" in run_error(capsys, [*base[:4], "--texts", str(missing_text)])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"image_id": 1, "feature": [1, 2]}\n{"image_id": 2\n')
    err = run_error(capsys, ["--image-feats", str(broken), *base[2:]])
    assert f"{broken}:2: expected a json object" in err
    ragged = write_jsonl(tmp_path / "ragged.jsonl", [{"image_id": 1, "feature": [1.0] * 8},
                                                     {"image_id": 2, "feature": [1.0] * 7}])
    assert f"{ragged}:2: feature has 7 values" in run_error(capsys, ["--image-feats", str(ragged), *base[2:]])
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"image_id": 1, "feature": [1.0] * 8}] * 2)
    assert "duplicate image_id '1'" in run_error(capsys, ["--image-feats", str(dup), *base[2:]])


def test_feature_file_with_nan_names_the_file_and_id(tmp_path, capsys):
    imgs, txts, gt_file, _ = feature_files(tmp_path)
    rows = [json.loads(line) for line in imgs.read_text().splitlines()]
    rows[3]["feature"][5] = float("nan")
    write_jsonl(imgs, rows)
    err = run_error(capsys, ["--image-feats", str(imgs), "--text-feats", str(txts), "--texts", str(gt_file)])
    assert err.endswith(f"{imgs}: the feature of image_id '1003' has NaN or infinite values")


def test_device_errors(paddle_ref, capsys):
    embeddings = str(paddle_ref / load_cases(paddle_ref)[0]["file"])
    err = run_error(capsys, [embeddings, "--device", "foo"])
    assert err.endswith("error: --device 'foo': not a device (use cpu, cuda or cuda:N)")
    assert "not a compute device" in run_error(capsys, [embeddings, "--device", "meta"])
    if not torch.cuda.is_available():
        result = cli(embeddings, "--device", "cuda")
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.strip() == ("python -m ernievil2_train.evaluate: error: "
                                         "--device cuda requested but no CUDA device is available")


def test_checkpoint_mode_input_errors(tmp_path, paddle_ref, capsys):
    ckpt, _ = tiny_checkpoint(tmp_path / "ckpt")
    max_id = max(load_vocab(paddle_ref / "vocab.txt").values())
    evalset = tmp_path / "evalset"
    write_evalset(evalset)
    base = ["--eval-set", str(evalset), "--max-len", str(MAX_LEN), "--device", "cpu", "--no-progress"]
    missing = tmp_path / "nope"
    for args, match in [
        (["--checkpoint", str(missing)], f"{missing}: checkpoint folder not found"),
        (["--checkpoint", str(ckpt), "--vocab", str(missing)], f"--vocab {missing}: file not found"),
        (["--checkpoint", str(ckpt), "--vocab", str(paddle_ref / "vocab.txt")],
         f"--vocab {paddle_ref / 'vocab.txt'}: other token ids than the checkpoint's own "
         f"{ckpt / 'vocab.txt'}"),
        (["--checkpoint", str(ckpt), "--max-len", str(MAX_LEN + 1)],
         f"--max-len {MAX_LEN + 1}: must be between 2 and the checkpoint's {MAX_LEN} text positions"),
        (["--checkpoint", str(ckpt), "--eval-set", str(evalset / "valid_imgs.tsv")],
         f"{evalset / 'valid_imgs.tsv'}: not an eval set (expected a folder, a .tar or a brace pattern)"),
    ]:
        assert match in run_error(capsys, [*base, *args])
    with pytest.raises(SystemExit) as exc:
        main([*base, "--checkpoint", str(ckpt), "--workers", "-3"])
    assert exc.value.code == 2 and "--workers must be 0 or more" in capsys.readouterr().err
    texts = evalset / "valid_texts.jsonl"
    lines = texts.read_text(encoding="utf-8").splitlines(keepends=True)
    texts.write_bytes("".join(lines[:2]).encode("utf-8") + "".join(lines[2:]).encode("gbk"))
    err = run_error(capsys, [*base, "--checkpoint", str(ckpt)])
    assert str(texts) in err and "UTF-8" in err
    (ckpt / "vocab.txt").unlink()
    foreign = ["--checkpoint", str(ckpt), "--vocab", str(paddle_ref / "vocab.txt")]
    assert f"ids go up to {max_id} but the model's text vocab_size is" in run_error(capsys, [*base, *foreign])


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "--image-feats" in capsys.readouterr().out


def test_checkpoint_on_eval_set(tmp_path, capsys):
    ckpt, model = tiny_checkpoint(tmp_path / "ckpt")
    texts, _, positives = write_evalset(tmp_path / "evalset")
    tokenizer = ErnieTokenizer(ckpt / "vocab.txt", max_len=MAX_LEN)
    transform = eval_transform(TINY["vision"]["image_size"])
    with torch.no_grad():
        text = model.encode_text(tokenizer(texts)["input_ids"], normalize=True)  # ranked by cosine
        pixels = torch.stack([transform(b) for b in load_evalset(tmp_path / "evalset").images])
        image = model.encode_image(pixels, normalize=True)
    expected = any_positive(text, image, positives, device="cpu")
    argv = ["--checkpoint", str(ckpt), "--eval-set", str(tmp_path / "evalset"), "--max-len", str(MAX_LEN),
            "--batch-size", "3", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["protocol"] == "any_positive" and (out["num_texts"], out["num_images"]) == (11, 7)
    assert {k: out[k] for k in expected} == pytest.approx(expected, abs=1e-12)
    err = run_error(capsys, [*argv[:6], "--split", "test"])
    assert "no eval set for split 'test'" in err
    err = run_error(capsys, ["--checkpoint", str(tmp_path), "--eval-set", str(tmp_path / "evalset")])
    assert "not a checkpoint folder" in err


@pytest.mark.parametrize("corruption", ["truncated image", "bad base64"])
def test_checkpoint_skips_unreadable_images(tmp_path, capsys, corruption):
    ckpt, model = tiny_checkpoint(tmp_path / "ckpt")
    texts, _, positives = write_evalset(tmp_path / "evalset", corrupt=(2,))
    if corruption == "bad base64":
        imgs = tmp_path / "evalset" / "valid_imgs.tsv"
        lines = imgs.read_text().splitlines(keepends=True)
        lines[2] = "img2\t@@@ not base64\n"
        imgs.write_text("".join(lines))
    tokenizer = ErnieTokenizer(ckpt / "vocab.txt", max_len=MAX_LEN)
    transform = eval_transform(TINY["vision"]["image_size"])
    images = load_evalset(tmp_path / "evalset").images
    assert images[2] == b"" if corruption == "bad base64" else len(images[2]) == 40
    keep = [t for t, pos in enumerate(positives) if pos != [2]]
    remap = {i: i - (i > 2) for i in range(7) if i != 2}
    with torch.no_grad():
        text = model.encode_text(tokenizer([texts[t] for t in keep])["input_ids"], normalize=True)
        image = model.encode_image(torch.stack([transform(b) for i, b in enumerate(images) if i != 2]),
                                   normalize=True)
    gt = [[remap[i] for i in positives[t] if i != 2] for t in keep]
    expected = any_positive(text, image, gt, device="cpu")
    argv = ["--checkpoint", str(ckpt), "--eval-set", str(tmp_path / "evalset"), "--max-len", str(MAX_LEN),
            "--device", "cpu", "--no-progress", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "skipped 1 unreadable image(s) (first: 'img2')" in captured.err
    out = json.loads(captured.out)
    assert (out["num_texts"], out["num_images"]) == (len(keep), 6)
    assert {k: out[k] for k in expected} == pytest.approx(expected, abs=1e-12)


def test_irregular_but_valid_files_take_the_line_reader(tmp_path, capsys):
    rng = np.random.default_rng(4)
    text = rng.standard_normal((6, 4)).astype(np.float32)
    image = rng.standard_normal((6, 4)).astype(np.float32)
    lines = [" ".join(map(str, t)) + "\t" + " ".join(map(str, i)) for t, i in zip(text, image, strict=True)]
    expected = ernie_protocol(text, image, device="cpu")
    for name, content in [("ids.txt", "".join(f"{line}\timg{k}\n" for k, line in enumerate(lines))),
                          ("crlf.txt", "".join(f"{line}\t1\r\n" for line in lines)),
                          ("exp.txt", "".join(f"{line} \t1\n".replace(" \t", "\t") for line in lines))]:
        path = tmp_path / name
        path.write_text(content)
        assert main([str(path), "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert {k: out[k] for k in expected} == expected, name


def read_vectors(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Text and image vectors of an embeddings file, parsed with `float()` as the official script does."""
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    text = np.array([[float(x) for x in r[0].split(" ")] for r in rows], dtype=np.float32)
    image = np.array([[float(x) for x in r[1].split(" ")] for r in rows], dtype=np.float32)
    return text, image


@pytest.mark.parametrize(("zeroed", "message"), [
    ("both", "{path}:1: text vector (column 1) is all zeros (not an embedding)"),
    ("image", "{path}:1: image vector (column 2) is all zeros (not an embedding)"),
    ("last text", "{path}:{n}: text vector (column 1) is all zeros (not an embedding)"),
])
def test_all_zero_vectors_are_refused_by_the_cli(paddle_ref, tmp_path, zeroed, message):
    case = load_cases(paddle_ref)[0]
    text, image = read_vectors(paddle_ref / case["file"])
    if zeroed == "both":
        text, image = np.zeros_like(text), np.zeros_like(image)
    elif zeroed == "image":
        image = np.zeros_like(image)
    else:
        text[-1] = 0.0
    if zeroed != "last text":  # every score ties: the strict-greater rule alone would report full recall
        assert ernie_protocol(text, image, device="cpu")["t2i/r@1"] == 1.0
    path = write_embeddings(tmp_path / "zeros.txt", text, image)
    result = cli(path)
    assert result.returncode == 2 and result.stdout == ""
    expected = message.format(path=path, n=len(text))
    assert result.stderr.splitlines() == [f"python -m ernievil2_train.evaluate: error: {expected}"]
    assert cli(path, "--protocol", "any_positive", "--json").stderr == result.stderr


def test_all_zero_feature_names_the_file_and_id(tmp_path, capsys):
    imgs, txts, gt_file, _ = feature_files(tmp_path)
    rows = [json.loads(line) for line in txts.read_text().splitlines()]
    rows[2]["feature"] = [0.0] * len(rows[2]["feature"])
    write_jsonl(txts, rows)
    err = run_error(capsys, ["--image-feats", str(imgs), "--text-feats", str(txts), "--texts", str(gt_file)])
    text_id = rows[2]["text_id"]
    assert err.endswith(f"{txts}: the feature of text_id '{text_id}' is all zeros (not an embedding)")


def test_checkpoint_giving_all_zero_embeddings_is_refused(tmp_path, capsys):
    ckpt, model = tiny_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        model.vision.norm.weight.zero_()
        model.vision.norm.bias.zero_()
    save_pretrained(model, ckpt)
    write_evalset(tmp_path / "evalset")
    argv = ["--checkpoint", str(ckpt), "--eval-set", str(tmp_path / "evalset"), "--max-len", str(MAX_LEN),
            "--device", "cpu", "--no-progress"]
    assert run_error(capsys, argv).endswith(f"{ckpt}: the model gives all-zero image embeddings")
