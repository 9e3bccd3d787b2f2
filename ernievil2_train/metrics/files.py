"""Readers for evaluation inputs: official `run_infer` embedding files and Chinese-CLIP feature files.

Every reader raises `EvalInputError` with a one-line message naming the file (and line) on bad input.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ernievil2_train.metrics.floats import parse_floats, parse_padded, read_padded


class EvalInputError(ValueError):
    """A user-facing problem with an evaluation input file."""


def _read_lines(path: Path) -> list[str]:
    if path.is_dir():
        raise EvalInputError(f"{path}: is a folder, not a file")
    if not path.exists():
        raise EvalInputError(f"{path}: no such file")
    try:  # a pipe (`<(zcat embeds.txt.gz)`) reads as well as a file
        data = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise EvalInputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    lines = data.split("\n")
    if lines[-1] == "":
        lines.pop()
    if not lines:
        raise EvalInputError(f"{path}: empty file")
    return lines


def _vectors(fields: list[str], path: Path, what: str, column: int) -> np.ndarray:
    """Parse space-separated float rows (one per line) into float32, exactly as `float()` then float32."""
    counts = [f.count(" ") + 1 for f in fields]
    dim = counts[0]
    for line, count in enumerate(counts, 1):
        if count != dim:
            raise EvalInputError(
                f"{path}:{line}: {what} vector (column {column}) has {count} values, line 1 has {dim}"
            )
    try:
        values = parse_floats(" ".join(fields))
    except ValueError:
        for line, field in enumerate(fields, 1):
            for token in field.split(" "):
                try:
                    float(token)
                except ValueError:
                    raise EvalInputError(
                        f"{path}:{line}: {what} vector (column {column}): {token!r} is not a number"
                    ) from None
        raise
    return values.reshape(len(fields), dim)


def _embeddings_fast(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """Whole-file vectorised read of a regular file; None when anything is off (the line-by-line reader
    then finds and reports the problem)."""
    buf, lo, hi = read_padded(path)
    if hi > lo and buf[hi - 1] == 10:
        hi -= 1
    if hi == lo:
        return None
    try:
        values, kinds = parse_padded(buf, lo, hi)
    except ValueError:
        return None
    kinds[-1] = 10
    per_line = int(np.argmax(kinds == 10)) + 1  # tokens of line 1: text_vec, image_vec, idx
    dim = (per_line - 1) // 2
    if dim < 1 or per_line != 2 * dim + 1 or kinds.size % per_line:
        return None
    expected = np.full(per_line, 32, dtype=np.uint8)
    expected[[dim - 1, 2 * dim - 1, 2 * dim]] = 9, 9, 10
    if not (kinds.reshape(-1, per_line) == expected).all():
        return None
    values = values.reshape(-1, per_line)
    return values[:, :dim], values[:, dim:-1]  # views: the scoring reads them in place


def read_embeddings_file(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a `run_infer` file (`text_vec \\t image_vec \\t idx` per line) into float32 text, image arrays."""
    path = Path(path)
    if path.is_file():
        fast = _embeddings_fast(path)
        if fast is not None:
            return fast
    lines = _read_lines(path)
    while lines and not lines[-1].strip():  # blank lines at the end (an editor's, files joined by cat)
        lines.pop()
    if not lines:
        raise EvalInputError(f"{path}: no rows, only blank lines")
    texts: list[str] = []
    images: list[str] = []
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            raise EvalInputError(f"{path}:{line_no}: a blank line between rows (text_vec, image_vec, idx)")
        parts = line.rstrip("\r").split("\t")
        if len(parts) != 3:
            raise EvalInputError(
                f"{path}:{line_no}: expected 3 tab-separated fields (text_vec, image_vec, idx), "
                f"got {len(parts)}"
            )
        texts.append(parts[0])
        images.append(parts[1])
    text = _vectors(texts, path, "text", 1)
    image = _vectors(images, path, "image", 2)
    if text.shape[1] != image.shape[1]:
        raise EvalInputError(
            f"{path}: text vectors have {text.shape[1]} values, image vectors {image.shape[1]}"
        )
    return text, image


@dataclass
class Features:
    """Feature vectors keyed by id, in file order."""

    ids: list[str]
    vectors: np.ndarray
    path: Path

    def index(self) -> dict[str, int]:
        return {i: n for n, i in enumerate(self.ids)}


def _json_records(path: Path, keys: tuple[str, str]) -> Iterator[tuple[str, list[Any]]]:
    """("file:line", the values of `keys`) for each non-blank line of a JSON-lines file."""
    for line_no, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            obj = json.loads(line)
            values = [obj[key] for key in keys]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            wanted = " and ".join(map(repr, keys))
            raise EvalInputError(f"{where}: expected a json object with {wanted} ({err})") from None
        yield where, values


_NUMBER_TYPES = {int, float}  # JSON numbers; not true/false (bool), strings, null or nested lists


def read_feature_jsonl(path: str | Path, id_key: str) -> Features:
    """Read a Chinese-CLIP feature file: one `{"<id_key>": ..., "feature": [...]}` object per line."""
    path = Path(path)
    ids: list[str] = []
    rows: list[list[float]] = []
    seen: set[str] = set()
    for where, (item_id, feature) in _json_records(path, (id_key, "feature")):
        item_id = str(item_id)
        if not isinstance(feature, list) or not feature or not {type(v) for v in feature} <= _NUMBER_TYPES:
            raise EvalInputError(f"{where}: 'feature' must be a non-empty list of numbers")
        if rows and len(feature) != len(rows[0]):
            raise EvalInputError(
                f"{where}: feature has {len(feature)} values, the first line has {len(rows[0])}"
            )
        if item_id in seen:
            raise EvalInputError(f"{where}: duplicate {id_key} {item_id!r}")
        seen.add(item_id)
        ids.append(item_id)
        rows.append(feature)
    if not rows:
        raise EvalInputError(f"{path}: no features")
    try:
        vectors = np.array(rows, dtype=np.float64).astype(np.float32)
    except (TypeError, ValueError, OverflowError) as err:
        raise EvalInputError(f"{path}: features must be lists of numbers ({err})") from None
    return Features(ids, vectors, path)


def read_ground_truth(
    path: str | Path, images: Features, texts: Features
) -> tuple[list[int], list[list[int]]]:
    """Map a `{split}_texts.jsonl` onto feature rows: (text feature row per text, image rows per text)."""
    path = Path(path)
    image_index, text_index = images.index(), texts.index()
    text_rows: list[int] = []
    positives: list[list[int]] = []
    seen: set[str] = set()
    for where, (text_id, image_ids) in _json_records(path, ("text_id", "image_ids")):
        text_id = str(text_id)
        if not isinstance(image_ids, list) or not image_ids:
            raise EvalInputError(f"{where}: 'image_ids' must be a non-empty list")
        if text_id not in text_index:
            raise EvalInputError(f"{where}: text_id {text_id!r} has no feature in {texts.path}")
        if text_id in seen:
            raise EvalInputError(f"{where}: duplicate text_id {text_id!r} (it would count as two queries)")
        seen.add(text_id)
        unknown = [i for i in image_ids if str(i) not in image_index]
        if unknown:
            raise EvalInputError(f"{where}: image id {unknown[0]!r} has no feature in {images.path}")
        text_rows.append(text_index[text_id])
        positives.append(sorted({image_index[str(i)] for i in image_ids}))
    if not text_rows:
        raise EvalInputError(f"{path}: no texts")
    return text_rows, positives
