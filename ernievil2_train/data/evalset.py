"""Retrieval eval sets: unique images, unique texts, and each text's positive images.

Two sources:

* the Chinese-CLIP layout: a folder with `{split}_imgs.tsv` (`image_id<TAB>base64 image`) and
  `{split}_texts.jsonl` (`{"text_id", "text", "image_ids": [...]}`);
* WebDataset shards: a folder with a `{split}.json` index, a `.tar` path, a brace pattern
  (`dir/val-{000000..000003}.tar`) or a list of tar paths. Images are made unique by the shard's folder and
  the json `image_id` (ids are unique within a data set only), texts by their text; a text's positives are
  every image it was paired with.

Missing files, malformed lines, unknown image ids and empty sets raise `FileNotFoundError` / `ValueError`
with a one-line message naming the file (and line).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand

from ernievil2_train.data.decode import IMAGE_EXTENSIONS, data_set_image_id, decode_base64
from ernievil2_train.data.publishing import refuse_half_published, refuse_half_published_shards
from ernievil2_train.data.tars import tar_members


@dataclass
class EvalSet:
    """Images and texts of a retrieval eval set; `text_to_images[t]` lists the indices of text t's images."""

    image_ids: list[str]
    images: list[bytes]
    text_ids: list[str]
    texts: list[str]
    text_to_images: list[list[int]]

    def __len__(self) -> int:
        return len(self.texts)


def clip_layout_files(folder: Path, split: str) -> tuple[Path, Path]:
    """The two files of a split in Chinese-CLIP's layout: `{split}_imgs.tsv` and `{split}_texts.jsonl`."""
    return folder / f"{split}_imgs.tsv", folder / f"{split}_texts.jsonl"


def load_evalset(path: str | Path | Sequence[str | Path], split: str = "valid") -> EvalSet:
    """Load an eval set from the Chinese-CLIP layout or from shards (see the module docstring)."""
    if not isinstance(path, (str, Path)):
        return _from_shards([Path(p) for p in path], str(list(path)))
    text = str(path)
    if "{" in text:
        return _from_shards([Path(p) for p in braceexpand(text)], text)
    path = Path(path)
    if path.is_dir():
        refuse_half_published(path, split, str(path))
        imgs, texts = clip_layout_files(path, split)
        if imgs.is_file() or texts.is_file():
            return _from_chinese_clip(imgs, texts)
        index = path / f"{split}.json"
        if index.is_file():
            return _from_index(index)
        raise FileNotFoundError(
            f"{path}: no eval set for split {split!r}: expected {imgs.name} + {texts.name} or a {index.name} "
            "shard index"
        )
    if path.suffix == ".tar":
        return _from_shards([path], text)
    if path.is_file():
        raise ValueError(f"{path}: not an eval set (expected a folder, a .tar or a brace pattern)")
    raise FileNotFoundError(f"eval set not found: {path} (expected a folder, a .tar or a brace pattern)")


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file (a byte-order mark is dropped); a line that is not UTF-8 is an
    error naming it."""
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{n}: not UTF-8 text ({err.reason})") from None
            yield n, line


def _from_chinese_clip(imgs: Path, texts: Path) -> EvalSet:
    for f in (imgs, texts):
        if not f.is_file():
            raise FileNotFoundError(f"eval set file missing: {f}")
    image_ids: list[str] = []
    images: list[bytes] = []
    index: dict[str, int] = {}
    for n, line in _text_lines(imgs):
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) != 2:
            raise ValueError(f"{imgs}:{n}: expected 'image_id<TAB>base64', got {len(parts)} columns")
        image_id = parts[0].strip()
        if image_id in index:
            raise ValueError(f"{imgs}:{n}: duplicate image id {image_id!r}")
        index[image_id] = len(images)
        image_ids.append(image_id)
        try:
            images.append(decode_base64(parts[1]))
        except ValueError:
            images.append(b"")  # no image: skipped and counted as unreadable, as an undecodable one is
    text_ids: list[str] = []
    text_list: list[str] = []
    positives: list[list[int]] = []
    seen: set[str] = set()
    for n, line in _text_lines(texts):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text_id, text, ids = _an_id(row["text_id"], "text_id"), row["text"], row["image_ids"]
        except (json.JSONDecodeError, RecursionError, KeyError, TypeError) as err:
            raise ValueError(f"{texts}:{n}: expected json with text_id, text, image_ids ({err})") from None
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{texts}:{n}: text must be a non-empty string, got {text!r}")
        if not isinstance(ids, list) or not ids:
            raise ValueError(f"{texts}:{n}: image_ids must be a non-empty list")
        try:
            ids = [_an_id(i, "image_ids") for i in ids]
        except TypeError as err:
            raise ValueError(f"{texts}:{n}: {err}") from None
        unknown = [i for i in ids if i not in index]
        if unknown:
            raise ValueError(f"{texts}:{n}: unknown image id {unknown[0]} (not in {imgs.name})")
        if text_id in seen:
            raise ValueError(f"{texts}:{n}: duplicate text_id {text_id!r} (it would count as two queries)")
        seen.add(text_id)
        text_ids.append(text_id)
        text_list.append(text)
        positives.append(list(dict.fromkeys(index[i] for i in ids)))
    result = EvalSet(image_ids, images, text_ids, text_list, positives)
    _check_not_empty(result, f"{imgs} + {texts}")
    return result


def _from_index(index: Path) -> EvalSet:
    try:
        shards = [index.parent / s["name"] for s in json.loads(index.read_text(encoding="utf-8"))["shards"]]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index}: not a shard index (expected {{'shards': [{{'name': ...}}]}})") from err
    return _from_shards(shards, str(index))


def _from_shards(paths: list[Path], what: str) -> EvalSet:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard missing: {missing[0]}{more}")
    if not paths:
        raise ValueError(f"{what}: no shards given")
    refuse_half_published_shards([str(path) for path in paths], what)
    result = EvalSet([], [], [], [], [])
    image_index: dict[str, int] = {}
    text_index: dict[str, int] = {}
    for path in paths:
        for key, fields in _read_samples(path):
            where = f"{path}:{key}"
            image = next((fields[e] for e in IMAGE_EXTENSIONS if e in fields), None)
            if image is None or "txt" not in fields or "json" not in fields:
                raise ValueError(f"{where}: sample needs an image, a txt and a json field")
            try:
                meta = json.loads(fields["json"])
                image_id = _an_id(meta["image_id"], "image_id")
                text_id = _an_id(meta.get("text_id", key), "text_id")
            except (json.JSONDecodeError, RecursionError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"{where}: json field needs an image_id ({err})") from None
            try:
                text = fields["txt"].decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{where}: txt is not UTF-8 text") from None
            if not text.strip():
                raise ValueError(f"{where}: txt holds no text")
            image_key = data_set_image_id(str(path), image_id)  # ids are unique within a data set only
            if image_key not in image_index:
                image_index[image_key] = len(result.images)
                result.image_ids.append(image_id)
                result.images.append(image)
            if text not in text_index:
                text_index[text] = len(result.texts)
                result.text_ids.append(text_id)
                result.texts.append(text)
                result.text_to_images.append([])
            pos = result.text_to_images[text_index[text]]
            if image_index[image_key] not in pos:
                pos.append(image_index[image_key])
    _check_not_empty(result, what)
    return result


def _an_id(value: object, name: str) -> str:
    """An id from json: a string or an integer, as text (`TypeError` naming the field otherwise: `null` or a
    list would become the text "None" or "['x']", the same for every such sample)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise TypeError(f"{name} must be a string or an integer, got {json.dumps(value)[:40]}")
    return str(value)


def _read_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield `(key, {ext: bytes})` per sample of a WebDataset tar (members grouped by key, in order)."""
    key: str | None = None
    fields: dict[str, bytes] = {}
    try:
        with path.open("rb") as stream:
            for member in tar_members(stream):  # read to its end-of-archive marker: a cut tar is refused
                name = member["fname"].rsplit("/", 1)
                prefix = name[0] + "/" if len(name) == 2 else ""
                base = name[-1]
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                if prefix + stem != key:
                    if key is not None:
                        yield key, fields
                    key, fields = prefix + stem, {}
                fields[ext.lower()] = member["data"]
    except tarfile.TarError as err:
        reason = str(err).splitlines()[0].rstrip(":") if str(err) else type(err).__name__
        raise ValueError(f"{path}: not a readable tar ({reason})") from err
    if key is not None:
        yield key, fields


def _check_not_empty(result: EvalSet, what: str) -> None:
    if not result.images or not result.texts:
        raise ValueError(f"{what}: empty eval set ({len(result.images)} images, {len(result.texts)} texts)")
