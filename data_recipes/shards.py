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
never loses or corrupts a finished shard; after a successful run, shards of the split that the new index
does not list (left by an earlier, larger run) are removed. `EvalSetWriter` writes the same records as an eval
set in the Chinese-CLIP layout; `write_outputs` wires both to a recipe's command-line options.

User mistakes (bad options, unusable inputs, nothing to write) end in a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import itertools
import json
import multiprocessing
import os
import re
import sys
import tarfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from tqdm import tqdm

DEFAULT_SHARD_SIZE = 10_000
DEFAULT_SHARD_BYTES = 1_000_000_000
FIXED_MTIME = 1_600_000_000
SKIP_EXAMPLES = 3
_ERROR_LIMIT = 200


class RecipeError(ValueError):
    """A user mistake in a recipe's inputs or options; reported as one line on stderr with exit status 2."""


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
    """An input that was not written, with the reason counted in the summary and an optional example (the
    missing path, the line number) shown with it."""

    reason: str
    count: int = 1
    example: str = ""


class SkipCounter(Counter):
    """Counts skipped inputs per reason, and keeps the first few examples of each reason."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, count: int = 1, example: str = "") -> None:
        self[reason] += count
        seen = self.examples.setdefault(reason, [])
        if example and len(seen) < SKIP_EXAMPLES:
            seen.append(short_text(example))

    def describe(self, reason: str) -> str:
        """`reason: count`, with its first examples when there are any."""
        examples = self.examples.get(reason)
        return f"{reason}: {self[reason]}" + (f" (first: {', '.join(examples)})" if examples else "")


def short_text(text: str, limit: int = _ERROR_LIMIT) -> str:
    """`text` on one line, cut to `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_error(err: BaseException) -> str:
    """A short one-line description of an exception that never embeds the data it failed on."""
    if isinstance(err, UnicodeDecodeError):
        text = f"not UTF-8 text ({err.reason} at byte {err.start})"
    elif isinstance(err, KeyError):
        text = f"missing key {err.args[0]!r}" if err.args else "missing key"
    elif isinstance(err, OSError) and err.strerror:
        text = err.strerror
    else:
        text = f"{type(err).__name__}: {err}"
    return short_text(text)


def commit(tmp: Path, path: Path) -> None:
    """Rename the finished `tmp` to `path`, durably: its bytes reach the disk before the name does, so a
    power loss leaves the old file or the complete new one, never an empty or short file under `path`."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a durable rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    commit(tmp, path)


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _safe(part: str, limit: int = 40) -> str:
    return _UNSAFE.sub("-", part)[:limit] or "x"


_W = TypeVar("_W", bound="_Writer")


class _Writer:
    """A context manager that keeps its output on success (`close`) and removes partial files on error
    (`abort`)."""

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self: _W) -> _W:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ShardSink(_Writer):
    """Writes samples into size-limited shards `{split}-%06d.tar` and keeps `{split}.json` up to date."""

    def __init__(
        self,
        out_dir: Path,
        split: str,
        shard_size: int = DEFAULT_SHARD_SIZE,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        skips: SkipCounter | None = None,
    ) -> None:
        if shard_size < 1 or shard_bytes < 1:
            raise ValueError("shard size and shard bytes must be positive")
        self.out_dir = Path(out_dir)
        self.split = split
        self.shard_size = shard_size
        self.shard_bytes = shard_bytes
        self.shards: list[dict[str, Any]] = []
        self.skips = skips if skips is not None else SkipCounter()
        self.images = 0
        self.removed = 0
        self._writer: tarfile.TarFile | None = None
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
        self._writer = tarfile.TarFile(tmp, "w", format=tarfile.GNU_FORMAT)
        self._count = 0
        self._bytes = 0

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        name = self._shard_name()
        commit(self.out_dir / (name + ".tmp"), self.out_dir / name)
        self.shards.append({"name": name, "samples": self._count})
        self._writer = None
        self._count = 0
        self.write_index()

    def write_sample(self, sample: dict[str, Any]) -> None:
        """Write one sample (`__key__` plus `{ext: bytes | str}`) as WebDataset members `key.ext`, rotating
        shards at the size limits."""
        if self._writer is None:
            self._open()
        key = sample["__key__"]
        for ext in sorted(k for k in sample if k != "__key__"):
            value = sample[ext]
            data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), FIXED_MTIME, 0o444
            self._writer.addfile(info, io.BytesIO(data))
            self._bytes += len(data)
        self._count += 1
        if self._count >= self.shard_size or self._bytes >= self.shard_bytes:
            self._finish()

    @property
    def empty(self) -> bool:
        return self.samples == 0

    def write_record(self, record: ImageRecord) -> int:
        """Write one sample per caption of `record`; returns the number of samples written. An image without
        captions has no sample: it is counted as skipped ("image without captions")."""
        if not record.captions:
            self.skips.add("image without captions", example=record.image_id)
            return 0
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
            (self.out_dir / (self._shard_name() + ".tmp")).unlink(missing_ok=True)
            self._writer = None
            self._count = 0

    def close(self) -> None:
        self._finish()
        self.write_index()
        self.removed = self.remove_stale_shards()

    def remove_stale_shards(self) -> int:
        """Delete this split's shards (`{split}-%06d.tar`) that the index does not list; returns how many."""
        pattern = re.compile(re.escape(self.split) + r"-\d{6}\.tar")
        listed = {s["name"] for s in self.shards}
        stale = [
            p
            for p in self.out_dir.iterdir()
            if pattern.fullmatch(p.name) and p.name not in listed and p.is_file()
        ]
        for path in stale:
            path.unlink()
        return len(stale)

    def describe(self) -> str:
        removed = f"; removed {self.removed} stale shards of an earlier run" if self.removed else ""
        return (
            f"{self.split}: wrote {self.samples} samples ({self.images} images) in {len(self.shards)} shards "
            f"to {self.out_dir}{removed}"
        )


def _map_chunk(fn: Callable[[Any], Any], chunk: list[Any]) -> list[Any]:
    return [fn(item) for item in chunk]


def parallel_map(
    fn: Callable[[Any], Any], items: Iterable[Any], workers: int, chunksize: int = 8, ahead: int = 4
) -> Iterator[Any]:
    """`map(fn, items)` in order, over a process pool when `workers > 1` (fn must be picklable).

    At most `ahead` chunks of `chunksize` items per worker are in flight, so `items` is read only a little
    ahead of the results taken (a large input is never pulled into memory at once).
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    items = iter(items)
    pending: deque[Any] = deque()
    with multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers) as pool:
        while True:
            chunk = list(itertools.islice(items, chunksize))
            if chunk:
                pending.append(pool.apply_async(_map_chunk, (fn, chunk)))
            if pending and (not chunk or len(pending) >= workers * ahead):
                yield from pending.popleft().get()
            if not chunk and not pending:
                return


_DECIMAL = re.compile(r"0|-?[1-9][0-9]{0,17}")


def json_id(value: str) -> str | int:
    """An id as it goes into a json file: an int when it is a plain decimal integer of at most 18 digits (so
    it fits a 64-bit integer), else the string as it is."""
    return int(value) if _DECIMAL.fullmatch(value) else value


class EvalSetWriter(_Writer):
    """Writes records as an eval set in the Chinese-CLIP layout: `{split}_imgs.tsv` + `{split}_texts.jsonl`.

    Images are streamed to the tsv (those without captions too: they stay in the gallery as distractors, as in
    MUGE's eval sets); texts are grouped by `text_id` (or, with `group_by="text"`, by the text itself, so
    identical captions of different images become one query with several positives) and written at `close()`.
    Both files appear under their final names only when complete. Ids written as decimal integers (`139`, not
    `0139`) are json numbers in `{split}_texts.jsonl`, as in Chinese-CLIP's own files, whose tools compare
    them with the integer image ids they read from `{split}_imgs.tsv`.
    """

    def __init__(self, out_dir: Path, split: str, group_by: str = "text_id") -> None:
        if group_by not in ("text_id", "text"):
            raise ValueError("group_by must be 'text_id' or 'text'")
        self.out_dir = Path(out_dir)
        self.split = split
        self.group_by = group_by
        self._made_dir = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.images_path = self.out_dir / f"{split}_imgs.tsv"
        self.texts_path = self.out_dir / f"{split}_texts.jsonl"
        self._images_tmp = self.images_path.with_name(self.images_path.name + ".tmp")
        self._file = self._images_tmp.open("w", encoding="utf-8")
        self._texts: dict[str, dict[str, Any]] = {}
        self.images = 0
        self.uncaptioned = 0

    def write_record(self, record: ImageRecord) -> int:
        self._file.write(f"{record.image_id}\t{base64.b64encode(record.data).decode('ascii')}\n")
        self.images += 1
        self.uncaptioned += not record.captions
        for text_id, text in record.captions:
            entry = self._texts.setdefault(
                text if self.group_by == "text" else text_id,
                {"text_id": json_id(text_id), "text": text, "image_ids": []},
            )
            image_id = json_id(record.image_id)
            if image_id not in entry["image_ids"]:
                entry["image_ids"].append(image_id)
        return len(record.captions)

    @property
    def texts(self) -> int:
        return len(self._texts)

    @property
    def empty(self) -> bool:
        return not self._texts

    def close(self) -> None:
        self._file.close()
        lines = "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in self._texts.values())
        write_atomic(self.texts_path, lines.encode("utf-8"))
        commit(self._images_tmp, self.images_path)

    def abort(self) -> None:
        """Drop the unfinished files, and the folder if this writer made it and it is left empty."""
        self._file.close()
        self._images_tmp.unlink(missing_ok=True)
        if self._made_dir and not any(self.out_dir.iterdir()):
            self.out_dir.rmdir()

    def describe(self) -> str:
        distractors = f" ({self.uncaptioned} of them without texts)" if self.uncaptioned else ""
        return (
            f"{self.split}: wrote eval set of {self.images} images{distractors} and {self.texts} texts "
            f"to {self.out_dir}"
        )


class _PassSkips:
    """Wraps a prepare function so that `Skip` items among the jobs pass straight through."""

    def __init__(self, fn: Callable[[Any], ImageRecord | Skip]) -> None:
        self.fn = fn

    def __call__(self, job: Any) -> ImageRecord | Skip:
        return job if isinstance(job, Skip) else self.fn(job)


def write_records(
    jobs: Iterable[Any],
    prepare: Callable[[Any], ImageRecord | Skip],
    sinks: Sequence[ShardSink | EvalSetWriter],
    skips: SkipCounter,
    workers: int = 1,
    total: int | None = None,
    desc: str = "images",
    progress: bool = True,
) -> None:
    """Prepare `jobs` into records in parallel and write each record to every sink, counting skips.

    Jobs may be `Skip`s (inputs the reader already rejected): they are counted in order with the rest.
    """
    with tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not progress) as bar:
        for result in parallel_map(_PassSkips(prepare), jobs, workers):
            if isinstance(result, Skip):
                skips.add(result.reason, result.count, result.example)
            else:
                for sink in sinks:
                    sink.write_record(result)
            bar.update(1)


def summary(sinks: Sequence[ShardSink | EvalSetWriter], skips: SkipCounter, label: str) -> str:
    """A short human summary: what each sink wrote, and skipped inputs per reason."""
    lines = [sink.describe() for sink in sinks]
    total = sum(skips.values())
    lines.append(f"{label}: skipped {total}" + (":" if total else ""))
    lines += [f"  {skips.describe(reason)}" for reason in sorted(skips)]
    return "\n".join(lines)


def nothing_written(source: Path | str, skips: SkipCounter) -> str:
    """The error for a run that wrote nothing: the input and the main skip reason."""
    total = sum(skips.values())
    if not total:
        return f"nothing written: {source} holds no samples"
    main = max(skips, key=skips.__getitem__)  # on a tie, the reason counted first
    others = total - skips[main]
    rest = f"; {others} more for other reasons" if others else ""
    return f"nothing written from {source}: every input was skipped, {skips.describe(main)}{rest}"


def write_outputs(
    jobs: Iterable[Any],
    prepare: Callable[[Any], ImageRecord | Skip],
    skips: SkipCounter,
    args: argparse.Namespace,
    total: int | None,
    group_by: str = "text_id",
    source: Path | str = "the input",
) -> str:
    """Write `jobs` as shards and/or an eval set per `args` (from `add_writer_args(..., outputs=True)`).

    Shards go to `args.out`, the eval set to `args.out / "eval"`; unfinished files are removed on failure.
    Returns the summary; raises `RecipeError` (leaving earlier outputs as they were) when every input of
    `source` was skipped.
    """
    outputs = chosen_outputs(args)
    sinks: list[ShardSink | EvalSetWriter] = []
    if outputs in ("shards", "both"):
        sinks.append(ShardSink(args.out, args.split, args.shard_size, args.shard_bytes, skips=skips))
    if outputs in ("evalset", "both"):
        sinks.append(EvalSetWriter(args.out / "eval", args.split, group_by=group_by))
    try:
        write_records(jobs, prepare, sinks, skips, args.workers, total, desc=args.split)
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise
    if all(sink.empty for sink in sinks):
        for sink in sinks:
            sink.abort()
        raise RecipeError(nothing_written(source, skips))
    for sink in sinks:
        sink.close()
    return summary(sinks, skips, args.split)


def chosen_outputs(args: argparse.Namespace) -> str:
    """What to write ("shards", "evalset" or "both"): `--outputs`, else shards for "train", both otherwise."""
    return args.outputs or ("shards" if args.split == "train" else "both")


def int_range(low: int = 1, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in `[low, high]` (no upper bound when `high` is None)."""
    wanted = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < low or (high is not None and number > high):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value!r}")
        return number

    return parse


positive_int = int_range(1)


def split_name(value: str) -> str:
    """An argparse type: a split name, used as a file-name prefix (non-empty, no path separators)."""
    bad = not value or value != value.strip() or value in (".", "..") or not value.isprintable()
    if bad or "/" in value or "\\" in value:
        raise argparse.ArgumentTypeError(
            f"must be a non-empty name without path separators or surrounding spaces, got {value!r}"
        )
    return value


def add_writer_args(
    parser: argparse.ArgumentParser, shard_size: int = DEFAULT_SHARD_SIZE, outputs: bool = False
) -> None:
    """The options every recipe shares: output, workers, shard limits (and for importers: split, outputs)."""
    if outputs:
        parser.add_argument(
            "--split",
            type=split_name,
            default="train",
            help="split name: prefix of the files read and written",
        )
        parser.add_argument(
            "--outputs",
            choices=["shards", "evalset", "both"],
            help="write shards, an eval set (Chinese-CLIP layout in OUT/eval) or both "
            "(default: shards for split 'train', both otherwise)",
        )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=max(1, min(8, os.cpu_count() or 1)),
        help="processes for image decoding/encoding (default: CPU count, at most 8)",
    )
    parser.add_argument(
        "--shard-size",
        type=positive_int,
        default=shard_size,
        help=f"samples per shard (default {shard_size})",
    )
    parser.add_argument(
        "--shard-bytes",
        type=positive_int,
        default=DEFAULT_SHARD_BYTES,
        help=f"bytes per shard before rotating (default {DEFAULT_SHARD_BYTES})",
    )


def fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """Exit with status 2 after a one-line error on stderr (no usage text)."""
    print(f"{parser.prog}: error: {short_text(message, limit=1000)}", file=sys.stderr)
    raise SystemExit(2)


@contextlib.contextmanager
def reported(parser: argparse.ArgumentParser, source: Path | str) -> Iterator[None]:
    """Run the block; a `RecipeError` or an `OSError` in it ends the run through `fail` (one line, status 2),
    an `OSError` naming its file, else `source`."""
    try:
        yield
    except RecipeError as err:
        fail(parser, str(err))
    except OSError as err:
        fail(parser, f"{err.filename or source}: {short_error(err)}")


def check_writer_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Create `--out` (exit with a one-line error, code 2, when it is a file or cannot be written)."""
    out: Path = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        fail(parser, f"--out {out} is a file, not a folder")
    except OSError as err:
        fail(parser, f"--out {out} cannot be created: {short_error(err)}")
    if not out.is_dir():
        fail(parser, f"--out {out} is not a folder")
    if not os.access(out, os.W_OK | os.X_OK):
        fail(parser, f"--out {out} is not writable")
