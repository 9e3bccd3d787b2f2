"""Readers of evaluation inputs: exact parsing, both embedding-file readers alike, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ernievil2_train.metrics.files import (
    EvalInputError,
    Features,
    read_embeddings_file,
    read_feature_jsonl,
    read_ground_truth,
)


def float_parse(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Columns 1 and 2 of an embeddings file through `float()` and a float32 cast, as the official script."""
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    text = np.array([[float(x) for x in r[0].split(" ")] for r in rows], dtype=np.float32)
    image = np.array([[float(x) for x in r[1].split(" ")] for r in rows], dtype=np.float32)
    return text, image


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def eval_cases(paddle_ref: Path) -> list[dict]:
    return json.loads((paddle_ref / "eval_cases.json").read_text())


def test_official_files_parse_exactly_like_float(paddle_ref: Path, eval_cases: list[dict]) -> None:
    """Every value of the reference embedding files is bit-identical to `float()` then float32."""
    assert eval_cases
    for case in eval_cases:
        path = paddle_ref / case["file"]
        text, image = read_embeddings_file(path)
        expected_text, expected_image = float_parse(path)
        assert text.dtype == image.dtype == np.float32
        assert text.shape == image.shape == (case["n"], case["dim"])
        assert np.array_equal(text, expected_text) and np.array_equal(image, expected_image), case["file"]


def test_equivalent_files_give_the_same_arrays(paddle_ref: Path, eval_cases: list[dict],
                                               tmp_path: Path) -> None:
    """CRLF line ends, a byte order mark, no final newline and non-numeric idx values (the last two need the
    line-by-line reader) give the arrays of the plain file, also read through a `str` path."""
    path = paddle_ref / eval_cases[0]["file"]
    fast = read_embeddings_file(str(path))
    content = path.read_text()
    variants = {
        "crlf.txt": content.replace("\n", "\r\n"),
        "bom.txt": "\ufeff" + content,
        "no_final_newline.txt": content.rstrip("\n"),
        "blank_lines_at_the_end.txt": content + "\n \r\n\t\n",
        "names.txt": "".join(line.rsplit("\t", 1)[0] + f"\timg{k}\n"
                             for k, line in enumerate(content.splitlines())),
    }
    for name, text in variants.items():
        got = read_embeddings_file(write(tmp_path / name, text))
        assert all(np.array_equal(a, b) for a, b in zip(got, fast, strict=True)), name


FIELDS = "expected 3 tab-separated fields (text_vec, image_vec, idx)"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("1 2\t3 4\t0\n\n1 2\t3 4\t1\n", ":2: a blank line between rows (text_vec, image_vec, idx)"),
        ("1 2\t3 4\t0\n \n1 2\t3 4\t1\n\n", ":2: a blank line between rows"),
        ("\n \n", ": no rows, only blank lines"),
        ("1  2\t3 4\t0\n", ":1: text vector (column 1): '' is not a number"),
        ("1 2\t3 4\t0\n1 2\t3 0x4\t1\n", ":2: image vector (column 2): '0x4' is not a number"),
        ("1 2\t3 4\t0\n1 2\t3\t1\n", ":2: image vector (column 2) has 1 values, line 1 has 2"),
        ("1 2\t3 4\t0\n1 2\t3 4\t1\t5\n", f":2: {FIELDS}, got 4"),
    ],
    ids=["blank-line", "blank-line-and-last-line", "only-blank-lines", "double-space", "hex", "short-vector",
         "four-fields"],
)
def test_embeddings_file_errors_name_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    path = write(tmp_path / "emb.txt", content)
    with pytest.raises(EvalInputError) as err:
        read_embeddings_file(path)
    assert str(err.value).startswith(f"{path}{message}")
    assert "\n" not in str(err.value)


def test_embeddings_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "emb.txt"
    path.write_bytes(b"1 2\t3 4\t0\n1 \xff2\t3 4\t1\n")
    with pytest.raises(EvalInputError, match=r"emb\.txt: not UTF-8 text \(invalid start byte at byte 12\)$"):
        read_embeddings_file(path)


def test_missing_empty_and_folder_inputs(tmp_path: Path) -> None:
    with pytest.raises(EvalInputError, match=r"nope\.txt: no such file$"):
        read_embeddings_file(tmp_path / "nope.txt")
    with pytest.raises(EvalInputError, match=r"is a folder, not a file$"):
        read_feature_jsonl(tmp_path, "image_id")
    with pytest.raises(EvalInputError, match=r"empty\.jsonl: empty file$"):
        read_feature_jsonl(write(tmp_path / "empty.jsonl", ""), "image_id")


def jsonl(path: Path, rows: list[object], blank_after: int | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "   ")
    return write(path, "\n".join(lines) + "\n")


def test_feature_file_keeps_file_order_and_string_ids(tmp_path: Path) -> None:
    """Ids become strings, rows keep the file's order, blank lines are skipped, values are the float32 of
    the JSON numbers."""
    rows = [{"text_id": 7, "feature": [0.1, -2]}, {"text_id": "a", "feature": [1e-3, 3.4028235e38]},
            {"text_id": 2, "feature": [1.0000000596046448, 0]}]
    features = read_feature_jsonl(jsonl(tmp_path / "t.jsonl", rows, blank_after=1), "text_id")
    assert features.ids == ["7", "a", "2"]
    assert features.vectors.dtype == np.float32
    expected = np.array([[float(v) for v in r["feature"]] for r in rows]).astype(np.float32)
    assert np.array_equal(features.vectors, expected)
    assert features.index() == {"7": 0, "a": 1, "2": 2}
    assert features.path == tmp_path / "t.jsonl"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"image_id": 1, "feature": [1]}, [1, 2]],
         ":2: expected a json object with 'image_id' and 'feature'"),
        ([{"image_id": 1, "feature": [1]}, {"id": 2, "feature": [1]}],
         ":2: expected a json object with 'image_id' and 'feature' ('image_id')"),
        ([{"image_id": 1, "features": [1]}], ":1: expected a json object with 'image_id' and 'feature'"),
        (["image_id"], ":1: expected a json object"),
        ([{"image_id": 1, "feature": "1 2"}], ":1: 'feature' must be a non-empty list of numbers"),
        ([{"image_id": 1, "feature": []}], ":1: 'feature' must be a non-empty list of numbers"),
        ([{"image_id": 1, "feature": [1, 2]}, {"image_id": 2, "feature": [1]}],
         ":2: feature has 1 values, the first line has 2"),
        ([{"image_id": 1, "feature": [1]}, {"image_id": "1", "feature": [2]}], ":2: duplicate image_id '1'"),
        ([{"image_id": 1, "feature": [1, {"x": 2}]}], ":1: 'feature' must be a non-empty list of numbers"),
        ([{"image_id": 1, "feature": [1, [2]]}], ":1: 'feature' must be a non-empty list of numbers"),
        ([{"image_id": 1, "feature": [[1, 0], [0, 1]]}], ":1: 'feature' must be a non-empty list of numbers"),
        ([{"image_id": 1, "feature": [1.0]}, {"image_id": 2, "feature": [True]}],
         ":2: 'feature' must be a non-empty list of numbers"),
        ([{"image_id": 1, "feature": ["1.5", 2]}], ":1: 'feature' must be a non-empty list of numbers"),
        ([{"image_id": 1, "feature": [None, 1]}], ":1: 'feature' must be a non-empty list of numbers"),
    ],
    ids=["list-line", "no-id", "no-feature", "string-line", "string-feature", "empty-feature", "ragged",
         "duplicate-id", "dict-value", "nested-value", "nested-rows", "bool-value", "numeric-string",
         "null-value"],
)
def test_feature_file_errors_name_file_and_line(tmp_path: Path, rows: list[object], message: str) -> None:
    path = jsonl(tmp_path / "img.jsonl", rows)
    with pytest.raises(EvalInputError) as err:
        read_feature_jsonl(path, "image_id")
    assert str(err.value).startswith(f"{path}{message}")
    assert "\n" not in str(err.value)


def test_feature_file_of_blank_lines_has_no_features(tmp_path: Path) -> None:
    path = write(tmp_path / "img.jsonl", "\n  \n\t\n")
    with pytest.raises(EvalInputError, match=r"img\.jsonl: no features$"):
        read_feature_jsonl(path, "image_id")


def features(tmp_path: Path, name: str, ids: list[object]) -> Features:
    rows = [{"id": i, "feature": [float(k), 1.0]} for k, i in enumerate(ids)]
    return read_feature_jsonl(jsonl(tmp_path / name, rows), "id")


def test_ground_truth_maps_ids_onto_feature_rows(tmp_path: Path) -> None:
    """Texts in the ground-truth file's order; ids match as strings (`3` and `"3"` alike); positives are
    sorted and de-duplicated feature rows."""
    images = features(tmp_path, "img.jsonl", [10, 11, "12", 13])
    texts = features(tmp_path, "txt.jsonl", ["b", "a", 3])
    gt = jsonl(tmp_path / "gt.jsonl", [
        {"text_id": 3, "text": "x", "image_ids": [13, "10", 13]},
        {"text_id": "a", "image_ids": [12]},
        {"text_id": "b", "image_ids": ["11", 10]},
    ], blank_after=2)
    assert read_ground_truth(gt, images, texts) == ([2, 1, 0], [[0, 3], [2], [0, 1]])


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"text_id": "a", "image_ids": []}], ":1: 'image_ids' must be a non-empty list"),
        ([{"text_id": "a", "image_ids": 10}], ":1: 'image_ids' must be a non-empty list"),
        ([{"text_id": "a"}], ":1: expected a json object with 'text_id' and 'image_ids'"),
        ([{"text_id": "a", "image_ids": [10]}, {"text_id": "z", "image_ids": [10]}],
         ":2: text_id 'z' has no feature in {texts}"),
        ([{"text_id": "a", "image_ids": [10, 99]}], ":1: image id 99 has no feature in {images}"),
        ([{"text_id": "a", "image_ids": [10]}, {"text_id": "a", "image_ids": [10]}],
         ":2: duplicate text_id 'a' (it would count as two queries)"),
    ],
    ids=["empty-image-ids", "image-ids-not-a-list", "no-image-ids", "unknown-text", "unknown-image",
         "duplicate-text"],
)
def test_ground_truth_errors_name_file_and_line(tmp_path: Path, rows: list[object], message: str) -> None:
    images = features(tmp_path, "img.jsonl", [10, 11])
    texts = features(tmp_path, "txt.jsonl", ["a"])
    gt = jsonl(tmp_path / "gt.jsonl", rows)
    with pytest.raises(EvalInputError) as err:
        read_ground_truth(gt, images, texts)
    assert str(err.value).startswith(f"{gt}" + message.format(texts=texts.path, images=images.path))


def test_ground_truth_without_texts(tmp_path: Path) -> None:
    images = features(tmp_path, "img.jsonl", [10])
    texts = features(tmp_path, "txt.jsonl", ["a"])
    with pytest.raises(EvalInputError, match=r"gt\.jsonl: no texts$"):
        read_ground_truth(write(tmp_path / "gt.jsonl", "\n \n"), images, texts)
