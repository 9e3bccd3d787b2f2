"""Shared shard writer: WebDataset tars with atomic finalisation, an index json, skip counting and a summary.

Every recipe turns its input into `ImageRecord`s (one image with all of its captions and tags) and hands
them to `write_records`, which prepares images in parallel workers and writes one sample per (image, caption)
pair:

    __key__            "{sequence}_{image_id}_{text_id}" (made tar-safe)
    jpg | png | webp   the image bytes
    txt                the caption (UTF-8)
    json               {"image_id", "text_id", "captions": [...all captions of the image...], "tags": [...]}

Shards are named `{split}-%06d.tar`. A run writes them into the hidden folder `.{split}.partial/` of the
output, and only its successful end moves them into place, writes the index `{split}.json` (shard names,
sample and image counts, skip counts) and removes the split's shards that the index does not list (left by an
earlier, larger run). A run either completes or leaves the earlier output as it was: a failed or interrupted
run removes its staging folder, and one left by a killed run is removed when the next run of the split starts.
`EvalSetWriter` writes the same records as an eval set in the Chinese-CLIP layout; `write_outputs` wires both
to a recipe's command-line options (`data_recipes.options`). Images are prepared over `data_recipes.pool`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import functools
import io
import json
import os
import re
import shutil
import sys
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from tqdm import tqdm

from data_recipes.pool import parallel_map, signals_held
from ernievil2_train.data.evalset import clip_layout_files
from ernievil2_train.data.publishing import publishing_marker

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
    missing path, the line number) shown with it; a skipped image counts the captions it takes along."""

    reason: str
    count: int = 1
    example: str = ""
    captions: int = 0


class RecipeSkips(Counter):
    """Counts skipped inputs per reason, the captions skipped images took along, and keeps the first few
    examples of each reason."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.examples: dict[str, list[str]] = {}
        self.captions: Counter[str] = Counter()

    def add(self, reason: str, count: int = 1, example: str = "", captions: int = 0) -> None:
        self[reason] += count
        self.captions[reason] += captions
        seen = self.examples.setdefault(reason, [])
        if example and len(seen) < SKIP_EXAMPLES:
            seen.append(short_text(example))

    def describe(self, reason: str) -> str:
        """`reason: count`, with its first examples when there are any, and the captions it took along when
        they are more (images of several captions)."""
        notes = [f"{self.captions[reason]} captions"] if self.captions[reason] > self[reason] else []
        notes += [f"first: {', '.join(self.examples[reason])}"] if self.examples.get(reason) else []
        return f"{reason}: {self[reason]}" + (f" ({'; '.join(notes)})" if notes else "")


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


def sync(path: Path) -> None:
    """Make sure the written file `path` (or the names in folder `path`) are on the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_into_place(tmp: Path, path: Path) -> None:
    """Rename `tmp`, whose bytes `stage` already synced to the disk, to `path`, then sync the folder: a power
    loss leaves the old file or the complete new one, never an empty or short file under `path`."""
    os.replace(tmp, path)
    sync(path.parent)


@contextlib.contextmanager
def publishing(folder: Path, split: str) -> Iterator[None]:
    """The renames of `split` into `folder` under its publishing mark (see `ernievil2_train.data.publishing`):
    put there (synced) before them, removed after them; left there when they fail or the run is killed."""
    marker = publishing_marker(folder, split)
    marker.touch()
    sync(folder)
    yield
    marker.unlink()
    sync(folder)


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _safe(part: str, limit: int = 40) -> str:
    return _UNSAFE.sub("-", part)[:limit] or "x"


_F = TypeVar("_F", bound=Callable[..., Any])


def _names_output(method: _F) -> _F:
    """A writer method whose `OSError`s that name no file (a full disk) name the writer's output folder."""

    @functools.wraps(method)
    def wrapper(self: _Writer, *args: Any) -> Any:
        try:
            return method(self, *args)
        except OSError as err:
            err.filename = err.filename or str(self.out_dir)
            raise

    return cast(_F, wrapper)


_W = TypeVar("_W", bound="_Writer")


class _Writer:
    """A writer that keeps its output on success (`stage` then `publish`) and removes its unfinished files on
    error (`abort`, which never raises). As a context manager it does either on exit (see `all_or_nothing`).

    `stage` finishes every file under a temporary name, synced to disk: whatever can fail for want of space
    fails here; `publish` only renames."""

    out_dir: Path

    def stage(self) -> None:
        raise NotImplementedError

    def publish(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self: _W) -> _W:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            abort_all([self])
        else:
            commit([self])


class SplitLock:
    """`folder/.{split}.lock`, held from creation to `release` (which removes it): a second run writing the
    same split into the same folder at the same time is refused with a `RecipeError` (their files would mix).
    The kernel drops the lock of a killed run; its leftover file is taken over and removed by the next."""

    def __init__(self, folder: Path, split: str) -> None:
        self.path = folder / f".{split}.lock"
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RecipeError(f"{folder}: another run is writing split '{split}' there now (it holds "
                                  f"{self.path.name}); wait for it to end or choose another --out") from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:  # not removed by a run ending meanwhile
                    break
            os.close(fd)
        self._fd: int | None = fd

    @contextlib.contextmanager
    def released_on_failure(self) -> Iterator[None]:
        """Release the lock when the block fails (the writer holding it could not be set up)."""
        try:
            yield
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Remove the lock file and let go of the lock (again: nothing)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


def abort_all(writers: Sequence[_Writer]) -> None:
    """Remove every writer's unfinished files, with Ctrl-C and SIGTERM held."""
    with signals_held():
        for writer in writers:
            writer.abort()


def commit(writers: Sequence[_Writer]) -> None:
    """Stage every writer, then publish every writer, with Ctrl-C and SIGTERM held: a failure while staging
    leaves none of their new files in place (all are aborted)."""
    try:
        with signals_held():
            for writer in writers:
                writer.stage()
            for writer in writers:
                writer.publish()
    except BaseException:
        abort_all(writers)
        raise


@contextlib.contextmanager
def all_or_nothing() -> Iterator[list[_Writer]]:
    """A list to put writers in as they are made: all of them commit when the block completes, all abort
    when it fails or is interrupted (those made before a failing one included)."""
    writers: list[_Writer] = []
    try:
        yield writers
    except BaseException:
        abort_all(writers)
        raise
    commit(writers)


class ShardSink(_Writer):
    """Writes samples into size-limited shards `{split}-%06d.tar`, staged in `.{split}.partial/` with their
    index `{split}.json` until `publish` moves them into place."""

    def __init__(
        self,
        out_dir: Path,
        split: str,
        shard_size: int = DEFAULT_SHARD_SIZE,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        skips: RecipeSkips | None = None,
    ) -> None:
        if shard_size < 1 or shard_bytes < 1:
            raise ValueError("shard size and shard bytes must be positive")
        self.out_dir = Path(out_dir)
        self.split = split
        self.shard_size = shard_size
        self.shard_bytes = shard_bytes
        self.shards: list[dict[str, Any]] = []
        self.skips = skips if skips is not None else RecipeSkips()
        self.images = 0
        self.removed = 0
        self._writer: tarfile.TarFile | None = None
        self._count = 0
        self._bytes = 0
        self._sequence = 0
        self.staging = self.out_dir / f".{split}.partial"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock = SplitLock(self.out_dir, split)
        with self._lock.released_on_failure():
            self._refuse_unlisted_shards()
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir()

    @property
    def samples(self) -> int:
        return sum(s["samples"] for s in self.shards) + self._count

    def _shard_name(self) -> str:
        return f"{self.split}-{len(self.shards):06d}.tar"

    def _open(self) -> None:
        self._writer = tarfile.TarFile(self.staging / self._shard_name(), "w", format=tarfile.GNU_FORMAT)
        self._count = 0
        self._bytes = 0

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self.shards.append({"name": self._shard_name(), "samples": self._count})
        self._writer = None
        self._count = 0

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

    @_names_output
    def write_record(self, record: ImageRecord) -> int:
        """Write one sample per caption of `record`; returns the number of samples written. An image without
        captions has no sample: it is counted as skipped ("image without captions")."""
        if not record.captions:
            self.skips.add("image without captions", example=record.image_id)
            return 0
        self.images += 1
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
        return len(record.captions)

    def index(self) -> bytes:
        """`{split}.json`: shard names and sample counts, sample and image totals, skip counts."""
        index = {
            "split": self.split,
            "samples": sum(s["samples"] for s in self.shards),
            "images": self.images,
            "shards": self.shards,
            "skipped": dict(sorted(self.skips.items())),
        }
        return json.dumps(index, ensure_ascii=False, indent=1).encode()

    def abort(self) -> None:
        """Remove the staging folder with every shard of this run (the earlier output stays as it was)."""
        if self._writer is not None:
            with contextlib.suppress(OSError):
                self._writer.close()
            self._writer = None
        shutil.rmtree(self.staging, ignore_errors=True)
        self._lock.release()

    @_names_output
    def stage(self) -> None:
        """Finish the last shard and write the index beside the shards in the staging folder."""
        self._finish()
        index = self.staging / f"{self.split}.json"
        index.write_bytes(self.index())
        for name in [shard["name"] for shard in self.shards] + [index.name]:
            sync(self.staging / name)

    @_names_output
    def publish(self) -> None:
        """Move the shards, then the index, into place; remove stale shards and the staging folder."""
        with publishing(self.out_dir, self.split):
            for name in [shard["name"] for shard in self.shards] + [f"{self.split}.json"]:
                move_into_place(self.staging / name, self.out_dir / name)
            self.removed = self.remove_stale_shards()
        self.staging.rmdir()
        self._lock.release()

    def _refuse_unlisted_shards(self) -> None:
        """A `RecipeError` when the folder holds shards of this split's name but no index of a recipe run:
        they are another data set's (publishing would overwrite some and remove the rest as stale)."""
        index, marker = self.out_dir / f"{self.split}.json", publishing_marker(self.out_dir, self.split)
        if index.exists() or marker.exists():  # a recipe run's (one killed while publishing, too)
            return
        found = sorted(self._split_shards())
        if found:
            raise RecipeError(
                f"{self.out_dir}: holds {len(found)} shard(s) named like this run's ({found[0].name}, ...) "
                f"but no {self.split}.json of a recipe run listing them: another data set's? Choose another "
                "--out or --split, or remove them")

    def _split_shards(self) -> list[Path]:
        """This split's shard files (`{split}-%06d.tar`) in the output folder."""
        pattern = re.compile(re.escape(self.split) + r"-\d{6}\.tar")
        return [p for p in self.out_dir.iterdir() if pattern.fullmatch(p.name) and p.is_file()]

    def remove_stale_shards(self) -> int:
        """Delete this split's shards (`{split}-%06d.tar`) that the index does not list; returns how many."""
        listed = {s["name"] for s in self.shards}
        stale = [p for p in self._split_shards() if p.name not in listed]
        for path in stale:
            path.unlink()
        return len(stale)

    def describe(self) -> str:
        removed = f"; removed {self.removed} stale shards of an earlier run" if self.removed else ""
        return (
            f"{self.split}: wrote {self.samples} samples ({self.images} images) in {len(self.shards)} shards "
            f"to {self.out_dir}{removed}"
        )


_DECIMAL = re.compile(r"0|-?[1-9][0-9]{0,17}")


def json_id(value: str) -> str | int:
    """An id as it goes into a json file: an int when it is a plain decimal integer of at most 18 digits (so
    it fits a 64-bit integer), else the string as it is."""
    return int(value) if _DECIMAL.fullmatch(value) else value


class EvalSetWriter(_Writer):
    """Writes records as an eval set in the Chinese-CLIP layout: `{split}_imgs.tsv` + `{split}_texts.jsonl`.

    Images are streamed to the tsv (those without captions too: they stay in the gallery as distractors, as in
    MUGE's eval sets); texts are grouped by `text_id` (or, with `group_by="text"`, by the text itself, so
    identical captions of different images become one query with several positives) and written at `stage()`.
    Both files are complete under temporary names before either is renamed into place. Ids written as decimal
    integers (`139`, not `0139`) are json numbers in `{split}_texts.jsonl`, as in Chinese-CLIP's own files,
    whose tools compare them with the integer image ids they read from `{split}_imgs.tsv`.
    """

    def __init__(self, out_dir: Path, split: str, group_by: str = "text_id") -> None:
        if group_by not in ("text_id", "text"):
            raise ValueError("group_by must be 'text_id' or 'text'")
        self.out_dir = Path(out_dir)
        self.split = split
        self.group_by = group_by
        self._made_dir = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.images_path, self.texts_path = clip_layout_files(self.out_dir, split)
        self._images_tmp = self.images_path.with_name(self.images_path.name + ".tmp")
        self._texts_tmp = self.texts_path.with_name(self.texts_path.name + ".tmp")
        self._lock = SplitLock(self.out_dir, split)
        with self._lock.released_on_failure():
            self._file = self._images_tmp.open("w", encoding="utf-8")
        self._texts: dict[str, dict[str, Any]] = {}
        self.images = 0
        self.uncaptioned = 0

    @_names_output
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

    @_names_output
    def stage(self) -> None:
        self._file.close()
        lines = "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in self._texts.values())
        self._texts_tmp.write_bytes(lines.encode("utf-8"))
        sync(self._images_tmp)
        sync(self._texts_tmp)

    @_names_output
    def publish(self) -> None:
        with publishing(self.out_dir, self.split):
            move_into_place(self._images_tmp, self.images_path)
            move_into_place(self._texts_tmp, self.texts_path)
        self._lock.release()

    def abort(self) -> None:
        """Remove the unfinished files, and the folder if this writer made it and it is left empty."""
        with contextlib.suppress(OSError):
            self._file.close()
        for path in (self._images_tmp, self._texts_tmp):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        self._lock.release()
        if self._made_dir:
            with contextlib.suppress(OSError):
                self.out_dir.rmdir()  # only when empty

    def describe(self) -> str:
        distractors = f" ({self.uncaptioned} of them without texts)" if self.uncaptioned else ""
        return (
            f"{self.split}: wrote eval set of {self.images} images{distractors} and {self.texts} texts "
            f"to {self.out_dir}"
        )


class FilesWriter(_Writer):
    """Whole small files (name -> bytes) for `out_dir`, staged beside their place as `.{name}.tmp`."""

    def __init__(self, out_dir: Path, files: dict[str, bytes]) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.files = files

    def _tmp(self, name: str) -> Path:
        return self.out_dir / f".{name}.tmp"

    @_names_output
    def stage(self) -> None:
        for name, data in self.files.items():
            self._tmp(name).write_bytes(data)
            sync(self._tmp(name))

    @_names_output
    def publish(self) -> None:
        for name in self.files:
            move_into_place(self._tmp(name), self.out_dir / name)

    def abort(self) -> None:
        for name in self.files:
            with contextlib.suppress(OSError):
                self._tmp(name).unlink(missing_ok=True)


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
    skips: RecipeSkips,
    workers: int = 1,
    total: int | None = None,
    desc: str = "images",
    progress: bool = True,
) -> None:
    """Prepare `jobs` into records in parallel and write each record to every sink, counting skips.

    Jobs may be `Skip`s (inputs the reader already rejected): they are counted in order with the rest.
    """
    bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not progress)
    with bar, contextlib.closing(parallel_map(_PassSkips(prepare), jobs, workers)) as results:
        for result in results:
            if isinstance(result, Skip):
                skips.add(result.reason, result.count, result.example, result.captions)
            else:
                for sink in sinks:
                    sink.write_record(result)
            bar.update(1)


def summary(sinks: Sequence[ShardSink | EvalSetWriter], skips: RecipeSkips, label: str) -> str:
    """A short human summary: what each sink wrote, and skipped inputs per reason."""
    lines = [sink.describe() for sink in sinks]
    total = sum(skips.values())
    lines.append(f"{label}: skipped {total}" + (":" if total else ""))
    lines += [f"  {skips.describe(reason)}" for reason in sorted(skips)]
    return "\n".join(lines)


def nothing_written(source: Path | str, skips: RecipeSkips) -> str:
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
    skips: RecipeSkips,
    args: argparse.Namespace,
    total: int | None,
    group_by: str = "text_id",
    source: Path | str = "the input",
) -> str:
    """Write `jobs` as shards and/or an eval set per `args` (from `add_writer_args(..., outputs=True)`).

    Shards go to `args.out`, the eval set to `args.out / "eval"`: all of them when the run completes, none
    (earlier outputs stay as they were) when it fails or is interrupted. Returns the summary; raises
    `RecipeError` when every input of `source` was skipped.
    """
    outputs = chosen_outputs(args)
    with all_or_nothing() as sinks:
        if outputs in ("shards", "both"):
            sinks.append(ShardSink(args.out, args.split, args.shard_size, args.shard_bytes, skips=skips))
        if outputs in ("evalset", "both"):
            sinks.append(EvalSetWriter(args.out / "eval", args.split, group_by=group_by))
        write_records(jobs, prepare, sinks, skips, args.workers, total, desc=args.split)
        if all(sink.empty for sink in sinks):
            raise RecipeError(nothing_written(source, skips))
    return summary(sinks, skips, args.split)


def chosen_outputs(args: argparse.Namespace) -> str:
    """What to write ("shards", "evalset" or "both"): `--outputs`, else shards for "train", both otherwise."""
    return args.outputs or ("shards" if args.split == "train" else "both")


