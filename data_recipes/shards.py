"""Shared shard writer: WebDataset tars with atomic finalisation, an index json, skip counting and a summary.

Every recipe turns its input into `ImageRecord`s (one image with all of its captions and tags) and hands
them to `write_records`, which prepares images in parallel workers and writes one sample per (image, caption)
pair:

    __key__            "{sequence}_{image_id}_{text_id}" (made tar-safe)
    jpg | png | webp   the image bytes
    txt                the caption (UTF-8)
    json               {"image_id", "text_id", "captions": [...all captions of the image...], "tags": [...]}

Shards are named `{split}-%06d.tar`; each is written to `*.tar.tmp` and renamed when complete, and the index
`{split}.json` (shard names, sample counts, skip counts) is rewritten after every finished shard, so a crash
never loses or corrupts a finished shard.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm
from webdataset import TarWriter

DEFAULT_SHARD_SIZE = 10_000
DEFAULT_SHARD_BYTES = 1_000_000_000
FIXED_MTIME = 1_600_000_000


@dataclass
class ImageRecord:
    """One image ready to be written: its encoded bytes, its captions `(text_id, text)` and its tags."""

    image_id: str
    ext: str
    data: bytes
    captions: list[tuple[str, str]]
    tags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Skip:
    """An input that was not written, with the reason counted in the summary."""

    reason: str
    count: int = 1


class SkipCounter(Counter):
    """Counts skipped inputs per reason."""

    def add(self, reason: str, count: int = 1) -> None:
        self[reason] += count


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _safe(part: str, limit: int = 40) -> str:
    return _UNSAFE.sub("-", part)[:limit] or "x"


class ShardSink:
    """Writes samples into size-limited shards `{split}-%06d.tar` and keeps `{split}.json` up to date."""

    def __init__(
        self,
        out_dir: Path,
        split: str,
        shard_size: int = DEFAULT_SHARD_SIZE,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
    ) -> None:
        if shard_size < 1 or shard_bytes < 1:
            raise ValueError("shard size and shard bytes must be positive")
        self.out_dir = Path(out_dir)
        self.split = split
        self.shard_size = shard_size
        self.shard_bytes = shard_bytes
        self.shards: list[dict[str, Any]] = []
        self.skips = SkipCounter()
        self.images = 0
        self._writer: TarWriter | None = None
        self._file = None
        self._count = 0
        self._bytes = 0
        self._sequence = 0
        self.out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def samples(self) -> int:
        return sum(s["samples"] for s in self.shards) + self._count

    def _shard_name(self) -> str:
        return f"{self.split}-{len(self.shards):06d}.tar"

    def _open(self) -> None:
        tmp = self.out_dir / (self._shard_name() + ".tmp")
        self._file = tmp.open("wb")
        self._writer = TarWriter(self._file, encoder=False, mtime=FIXED_MTIME)
        self._count = 0
        self._bytes = 0

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()
        name = self._shard_name()
        os.replace(self.out_dir / (name + ".tmp"), self.out_dir / name)
        self.shards.append({"name": name, "samples": self._count})
        self._writer = None
        self._file = None
        self._count = 0
        self.write_index()

    def write_sample(self, sample: dict[str, Any]) -> None:
        """Write one sample dict (`__key__` plus bytes/str fields), rotating shards at the size limits."""
        if self._writer is None:
            self._open()
        encoded = {
            k: v.encode("utf-8") if isinstance(v, str) and k != "__key__" else v for k, v in sample.items()
        }
        self._bytes += self._writer.write(encoded)
        self._count += 1
        if self._count >= self.shard_size or self._bytes >= self.shard_bytes:
            self._finish()

    def write_record(self, record: ImageRecord) -> int:
        """Write one sample per caption of `record`; returns the number of samples written."""
        captions = [text for _, text in record.captions]
        for text_id, text in record.captions:
            meta = {
                "image_id": record.image_id,
                "text_id": text_id,
                "captions": captions,
                "tags": record.tags,
            }
            key = f"{self._sequence:09d}_{_safe(record.image_id)}_{_safe(text_id)}"
            self._sequence += 1
            self.write_sample(
                {
                    "__key__": key,
                    record.ext: record.data,
                    "txt": text,
                    "json": json.dumps(meta, ensure_ascii=False),
                }
            )
        self.images += 1
        return len(record.captions)

    def write_index(self) -> None:
        index = {
            "split": self.split,
            "samples": sum(s["samples"] for s in self.shards),
            "images": self.images,
            "shards": self.shards,
            "skipped": dict(sorted(self.skips.items())),
        }
        write_atomic(
            self.out_dir / f"{self.split}.json", json.dumps(index, ensure_ascii=False, indent=1).encode()
        )

    def abort(self) -> None:
        """Drop the unfinished shard (finished shards and their index stay)."""
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            (self.out_dir / (self._shard_name() + ".tmp")).unlink(missing_ok=True)
            self._writer = None
            self._count = 0

    def close(self) -> None:
        self._finish()
        self.write_index()

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def parallel_map(
    fn: Callable[[Any], Any], items: Iterable[Any], workers: int, chunksize: int = 8
) -> Iterator[Any]:
    """`map(fn, items)` in order, over a process pool when `workers > 1` (fn must be picklable)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers) as pool:
        yield from pool.imap(fn, items, chunksize=chunksize)


def write_records(
    sink: ShardSink,
    jobs: Iterable[Any],
    prepare: Callable[[Any], ImageRecord | Skip],
    workers: int = 1,
    total: int | None = None,
    desc: str | None = None,
    progress: bool = True,
) -> None:
    """Prepare `jobs` into records in parallel and write them to `sink`, counting skips."""
    bar = tqdm(total=total, desc=desc or sink.split, unit="img", file=sys.stderr, disable=not progress)
    with bar:
        for result in parallel_map(prepare, jobs, workers):
            if isinstance(result, Skip):
                sink.skips.add(result.reason, result.count)
            else:
                sink.write_record(result)
            bar.update(1)


def summary(sink: ShardSink) -> str:
    """A short human summary: samples, images and shards written, and skips per reason."""
    lines = [
        f"{sink.split}: wrote {sink.samples} samples ({sink.images} images) in {len(sink.shards)} shards "
        f"to {sink.out_dir}"
    ]
    total = sum(sink.skips.values())
    lines.append(f"{sink.split}: skipped {total}" + (":" if total else ""))
    lines += [f"  {reason}: {n}" for reason, n in sorted(sink.skips.items())]
    return "\n".join(lines)


def add_writer_args(parser, shard_size: int = DEFAULT_SHARD_SIZE) -> None:
    """The options every recipe shares: output, workers and shard limits."""
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--workers",
        type=int,
        default=max(1, min(8, os.cpu_count() or 1)),
        help="processes for image decoding/encoding (default: CPU count, at most 8)",
    )
    parser.add_argument(
        "--shard-size", type=int, default=shard_size, help=f"samples per shard (default {shard_size})"
    )
    parser.add_argument(
        "--shard-bytes",
        type=int,
        default=DEFAULT_SHARD_BYTES,
        help=f"bytes per shard before rotating (default {DEFAULT_SHARD_BYTES})",
    )
