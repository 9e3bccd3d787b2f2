"""Where shards come from: a folder, a recipe's index (local or over http), a list file, a pattern or a
glob, resolved to urls and, when an index lists them, their sample counts; and the reading of their tars."""

from __future__ import annotations

import glob
import json
import logging
import os
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import webdataset as wds

from ernievil2_train.data.batches import SkipCounter
from ernievil2_train.data.decode import is_remote
from ernievil2_train.data.publishing import refuse_half_published_shards
from ernievil2_train.data.tars import tar_members

log = logging.getLogger(__name__)

INDEX_TIMEOUT_S = 30  # reading a remote shard index
VALIDATION_SPLITS = ("val", "valid", "validation")  # the names recipes give a validation split


def shard_key(url: str) -> str:
    """How shard sizes are keyed: the canonical path of a local shard, the url itself of a remote one."""
    return url if is_remote(url) else os.path.realpath(url)


def _indexed_sizes(urls: list[str], split: str) -> dict[str, int]:
    """`{shard_key: samples}` from the `{split}.json` index (written by `data_recipes`) beside each local
    shard, for the shards it lists; however the shards were named (directory, list, pattern)."""
    sizes: dict[str, int] = {}
    folders = {os.path.dirname(shard_key(url)) for url in urls if not is_remote(url)}
    for folder in sorted(folders):
        index = Path(folder) / f"{split}.json"
        if index.is_file():
            sizes.update(_read_index(str(index), f"{split} index").sizes)
    return sizes


class ShardSet(NamedTuple):
    """Resolved shards: their urls, the samples their index counts (None without an index), and
    `{shard_key: samples}` for the shards an index lists (to catch short shards)."""

    urls: list[str]
    samples: int | None
    sizes: dict[str, int]


def _listed_shards(source: str, name: str) -> ShardSet:
    """The shards an index lists, which must all be there when it is local (a run would quietly train on
    fewer)."""
    shards = _read_index(source, name)
    missing = [url for url in shards.urls if not is_remote(url) and not os.path.isfile(url)]
    _refuse_missing(missing, source, name)
    return shards


def _read_index(source: str, name: str) -> ShardSet:
    """The shards a `data_recipes` index (`{split}.json`, a local file or an http(s) url) lists beside it."""
    remote = is_remote(source)
    try:
        if remote:
            with urllib.request.urlopen(source, timeout=INDEX_TIMEOUT_S) as response:
                raw = response.read()
        else:
            raw = Path(source).read_bytes()
    except (OSError, ValueError) as exn:
        raise FileNotFoundError(f"{name}: cannot read shard index {source} ({exn})") from None
    try:
        index = json.loads(raw)
        sizes = {str(s["name"]): int(s.get("samples", 0)) for s in index.get("shards", [])}
        total = int(index.get("samples", sum(sizes.values())))
    except (ValueError, KeyError, TypeError, AttributeError) as exn:
        raise ValueError(f"{source}: not a shard index ({type(exn).__name__}: {exn})") from None
    if remote:
        urls = [f"{source.rsplit('/', 1)[0]}/{shard}" for shard in sizes]
    else:
        urls = [str(Path(source).parent / shard) for shard in sizes]
    return ShardSet(urls, total, {shard_key(url): n for url, n in zip(urls, sizes.values(), strict=True)})


def _without_index(urls: list[str], split: str) -> ShardSet:
    """Shards named without an index: their sample count is known when the `{split}.json` beside them lists
    every one of them."""
    sizes = _indexed_sizes(urls, split)
    keys = [shard_key(url) for url in urls]
    return ShardSet(urls, sum(sizes[k] for k in keys) if all(k in sizes for k in keys) else None, sizes)


def _folder_split(folder: Path, split: str, name: str) -> ShardSet | None:
    """The `split` shards of `folder`: from `{split}.json`, else `{split}-*.tar`; None if it has neither."""
    index = folder / f"{split}.json"
    if index.is_file():
        return _listed_shards(str(index), name)
    urls = sorted(glob.glob(str(folder / f"{split}-*.tar")))
    return _without_index(urls, split) if urls else None


def _split_source(folder: Path, split: str) -> str:
    """How to name the `split` shards of `folder` alone: its index, else the shard glob."""
    index = folder / f"{split}.json"
    return str(index) if index.is_file() else str(folder / f"{split}-*.tar")


def _directory_shards(folder: Path, split: str, name: str) -> ShardSet:
    """The `split` shards of `folder`; for a validation split it lacks, those of its only other validation
    split (`VALIDATION_SPLITS`), if it has exactly one; all its `.tar` files when none is named for a split
    (`NAME-*.tar`), as img2dataset writes them."""
    shards = _folder_split(folder, split, name)
    if shards is None and split in VALIDATION_SPLITS:
        found = {other: _folder_split(folder, other, name) for other in VALIDATION_SPLITS if other != split}
        others = {other: found_shards for other, found_shards in found.items() if found_shards is not None}
        if len(others) > 1:
            choices = " or ".join(_split_source(folder, other) for other in others)
            raise FileNotFoundError(
                f"{name}: no {split} split in directory {folder} but {' and '.join(others)}; "
                f"set {name} to the one to read: {choices}"
            )
        if others:
            [(other, shards)] = others.items()
            log.info("%s: directory %s has no %s split, reading its %s split", name, folder, split, other)
    tars = sorted(glob.glob(str(folder / "*.tar")))
    if shards is None and tars and not any("-" in Path(tar).stem for tar in tars):
        # shards of no split (img2dataset names them 00000.tar, ...): the folder's shards are the data set
        log.info("%s: directory %s has no %s-*.tar shards; reading its %d .tar files", name, folder, split,
                 len(tars))
        return _without_index(tars, split)
    if shards is None or not shards.urls:
        held = {Path(tar).name.rsplit("-", 1)[0] for tar in glob.glob(str(folder / "*-*.tar"))} - {split}
        holds = f" (it holds {', '.join(f'{other}-*.tar' for other in sorted(held))})" if held else ""
        raise FileNotFoundError(f"{name}: no {split}-*.tar shards in directory {folder}{holds}")
    return shards


def resolve_shards(spec: str | list[str], split: str, name: str) -> ShardSet:
    """Shard urls and, when an index says so, their sample counts.

    `spec`: a directory (shards from `{split}.json`, else `{split}-*.tar`; see `_directory_shards`), an index
    file or http(s) url (`.json`, written by `data_recipes`), a list file (`.txt`, one url a line), a brace
    pattern (`train-{000000..000009}.tar`), a glob, or a list of those; shards named by a list, pattern or
    glob are counted when the `{split}.json` beside them lists them all. `name` is the config key, for error
    messages. On the command line Hydra needs a brace pattern quoted inside the override:
    `"data.train_shards='data/train-{000000..000009}.tar'"`. A local split that a recipe run left
    half-published is refused (see `publishing`).
    """
    shards = _resolve_shards(spec, split, name)
    refuse_half_published_shards(shards.urls, name)
    return shards


def _resolve_shards(spec: str | list[str], split: str, name: str) -> ShardSet:
    """`resolve_shards` without the check of the splits it found."""
    if isinstance(spec, list | tuple):
        parts = [_resolve_shards(s, split, name) for s in spec]
        urls = [url for part in parts for url in part.urls]
        counts = [part.samples for part in parts]
        sizes = {key: n for part in parts for key, n in part.sizes.items()}
        return ShardSet(urls, None if None in counts else sum(counts), sizes)
    spec = str(spec)
    if spec.endswith(".json"):
        if is_remote(spec) and not spec.startswith(("http://", "https://")):
            raise ValueError(f"{name}: a shard index is read from a local file or an http(s) url, not {spec}")
        shards = _listed_shards(spec if is_remote(spec) else str(Path(spec).expanduser()), name)
        if not shards.urls:
            raise FileNotFoundError(f"{name}: shard index {spec} lists no shards")
        return shards
    path = Path(spec).expanduser()
    if path.is_dir():
        return _directory_shards(path, split, name)
    if path.suffix == ".txt" and path.is_file():
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        urls = [ln for ln in lines if ln and not ln.startswith("#")]
        if not urls:
            raise FileNotFoundError(f"{name}: shard list {spec} is empty")
        _refuse_missing([url for url in urls if not is_remote(url) and not Path(url).is_file()], spec, name)
        return _without_index(urls, split)
    if is_remote(spec):
        return ShardSet(list(wds.shardlists.expand_urls(spec)), None, {})
    patterns = list(wds.shardlists.expand_urls(spec))
    matches = {pattern: sorted(glob.glob(pattern)) for pattern in patterns}
    if not any(matches.values()):
        raise FileNotFoundError(f"{name}: no shards match {spec}")
    _refuse_missing([pattern for pattern, found in matches.items() if not found], spec, name)
    return _without_index([url for found in matches.values() for url in found], split)


def _refuse_missing(missing: list[str], spec: str, name: str) -> None:
    """A `FileNotFoundError` naming the shards of `spec` that are not there (a run would quietly train on
    fewer), if any."""
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{name}: {spec} names shards that are not there: {missing[0]}{more}")


def _member_key(member: dict[str, Any]) -> str | None:
    """The sample key of a tar member (`s00001` of `s00001.jpg`); None for a name without an extension."""
    return wds.tariterators.base_plus_ext(member["fname"])[0]


def _unambiguous(sample: list[dict[str, Any]], key: str | None, counter: SkipCounter) -> list[dict[str, Any]]:
    """The members of the sample `key`; none, counted as a `bad_tar`, when it has two members of one name
    (extensions compared in lower case, as samples are built). Members without a key pass as they are."""
    if key is None:
        return sample
    seen: set[str] = set()
    for member in sample:
        name = member["fname"].lower()
        if name in seen:
            where = f"{member['__url__']}: sample {key}"
            counter.count("bad_tar", f"{where}: two members named {member['fname']}")
            return []
        seen.add(name)
    return sample


def read_shards(
    sources: Iterable[dict[str, Any]], counter: SkipCounter, expected: dict[str, int] | None = None
) -> Iterator[dict[str, Any]]:
    """`{"url"}` dicts -> tar member dicts, `{}` after each shard. A shard that cannot be opened or read to
    its end-of-archive marker (missing, truncated, corrupt) counts one `bad_tar`; the samples read before
    the error are kept.
    A sample with two members of one name (two captions, say: which is it?) is left out as a `bad_tar`.
    `expected`: samples per shard (`ShardSet.sizes`); a shard read to its end with fewer samples counts the
    missing ones as `short_shard`."""
    expected = expected or {}
    for source in sources:
        url = source["url"]
        samples = 0
        sample: list[dict[str, Any]] = []  # the members of the sample being read
        key: str | None = None  # their sample key
        try:
            stream = wds.gopen(url)
            try:
                for member in tar_members(stream):
                    member["__url__"] = url
                    member_key = _member_key(member)
                    if sample and member_key != key:
                        samples += key is not None
                        yield from _unambiguous(sample, key, counter)
                        sample = []
                    key = member_key
                    sample.append(member)
            finally:
                stream.close()
        except Exception as exn:
            counter.count("bad_tar", f"{url}: {type(exn).__name__}: {exn}")
        if sample:  # the last sample, or the one read up to an error
            samples += key is not None
            yield from _unambiguous(sample, key, counter)
        wanted = expected.get(shard_key(url), 0)
        if samples < wanted:
            message = f"{url}: holds {samples} of the {wanted} samples its index lists"
            counter.count("short_shard", message, samples=wanted - samples)
        yield {}
