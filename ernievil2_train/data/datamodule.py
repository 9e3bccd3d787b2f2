"""WebDataset LightningDataModule producing multi-view batches (the batch format is in the README).

Training stream per rank: shards (split by the trainer's rank, then by worker; or drawn with replacement)
-> sample shuffle buffer -> decode + views (`SampleTransform`) -> batches of `batch_size` collated inside the
worker -> `DataLoader(batch_size=None)`.
Epochs are virtual: each worker yields `ceil(batches_per_rank / num_workers)` batches (the shard stream
repeats as needed), so every rank sees exactly `len(train_dataloader())` batches and DDP never waits on a
rank that ran out of data. Shards that give no usable sample at all stop the stream with `NoUsableSample`
instead of repeating forever: a pass over a worker's shards that gives none, or, resampling, more shard draws
in a row without one than `barren_draw_limit` allows.

Validation is one pass over the validation shards, split the same way: each rank reads every `world`-th
shard from its rank, and its loader workers share those (a rank or worker may get none). A worker that
skipped samples but gave no batch (all its samples were bad) ends with a batch holding only `skipped`, so
every skip is reported.

Every pass is a function of (seed, epoch, rank, worker): the shard order, the sample shuffle and the
augmentations are seeded from them (each sample's augmentations by its own seed). A resumed run reads what the
uninterrupted run would have read: the next epoch after an epoch-end checkpoint; after a mid-epoch one, the
interrupted epoch's stream without the batches already trained (their samples are read, not decoded). Each
training batch carries `batch["stream_read"]` = (stream, samples that stream had read when the batch was
complete, skipped ones included); the datamodule takes it off before the device transfer and keeps, in the
checkpoint, where every stream of every rank stood after its last trained batch, so samples skipped before
the checkpoint do not shift the resumed stream.

Skipped samples. Bad data never stops the stream: every failure is counted per reason (`SKIP_REASONS`) in the
worker process where it happens, by the same `SkipCounter` the collate of that worker uses, and each batch
carries `batch["skipped"]`: LongTensor[len(SKIP_REASONS)], the skips that worker saw since its previous
batch. Summing `batch["skipped"]` over an epoch (and over ranks) gives the epoch's skip counts, whatever the
number of workers; `skip_metrics(batch)` names them for `self.log(..., reduce_fx="sum")`.
"""

from __future__ import annotations

import functools
import glob
import inspect
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import lightning as L
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from ernievil2_train.cli import ignore_stop_signals
from ernievil2_train.config_checks import ConfigError
from ernievil2_train.data.decode import DEFAULT_MAX_IMAGE_PIXELS, SKIP_REASONS, SkipSample
from ernievil2_train.data.views import SampleTransform, ViewConfig
from ernievil2_train.models.text import padded_length
from ernievil2_train.vision.augment import TrainViews, normalize_uint8

log = logging.getLogger(__name__)

SKIPPED_KEY = "skipped"
IMAGE_KEYS = ("image", "image_view2")
TEXT_ID_KEYS = ("caption_ids", "text_view_ids", "tag_ids")
_LOGGED_PER_REASON = 5
BARREN_DRAWS_MIN = 256  # above the shuffle buffer's first fill (at most 100 samples, so 100 draws)
BARREN_DRAWS_PER_SHARD = 4
SAMPLE_SEED_KEY = "__seed__"
STREAM_READ_KEY = "stream_read"
UNKNOWN = -1
INDEX_TIMEOUT_S = 30  # reading a remote shard index
VALIDATION_SPLITS = ("val", "valid", "validation")  # the names recipes give a validation split


class NoUsableSample(ConfigError):
    """The training shards give no sample that decodes: every one is corrupt or lacks a field."""


def barren_draw_limit(shards: int) -> int:
    """Resampled shard draws in a row that may give no usable sample before the stream stops.

    Any usable sample starts the count again, so a stream with samples flowing never stops. The limit grows
    with the number of shards: where a fraction `g` of the shards gives samples, `limit` bad draws in a row
    happen with probability `(1 - g) ** limit` (below 1e-30 for g = 1/4, whatever the number of shards),
    and with no usable shard the error comes after a few draws of each shard.
    """
    return max(BARREN_DRAWS_MIN, BARREN_DRAWS_PER_SHARD * shards)


def _share(src: Iterable[Any], rank: int, world: int, index: int, count: int) -> Iterator[Any]:
    """Every `world`-th item from `rank` (a rank's shards), then every `count`-th of those from `index`."""
    ours = itertools.islice(src, rank, None, world)
    yield from itertools.islice(ours, index, None, count)


def _rank_and_worker_shards(src: Iterable[Any], rank: int, world: int) -> Iterator[Any]:
    """The shards of `rank` among `world`, then of this loader worker among the loader's workers."""
    worker, workers = _worker()
    yield from _share(src, rank, world, worker, workers)


class SkipCounter:
    """Per-process skip counts; used as the webdataset exception handler (warn, count, continue)."""

    def __init__(self, stage: str = "sample") -> None:
        self.stage = stage
        self.pending = [0] * len(SKIP_REASONS)
        self.total = [0] * len(SKIP_REASONS)

    def count(self, reason: str, message: str, samples: int = 1) -> None:
        index = SKIP_REASONS.index(reason)
        logged = self.total[index] < _LOGGED_PER_REASON
        self.pending[index] += samples
        self.total[index] += samples
        if logged:
            log.warning("skipped a sample (%s): %s", reason, message)

    def tar_handler(self, exn: Exception) -> bool:
        """Handler for grouping files into samples (e.g. duplicate names): counted as a bad tar."""
        self.count("bad_tar", f"{type(exn).__name__}: {exn}")
        return True

    def sample_handler(self, exn: Exception) -> bool:
        """Handler for the decode/views stage: `SkipSample` carries its reason, anything else is 'other'."""
        if isinstance(exn, SkipSample):
            self.count(exn.reason, str(exn))
        else:
            self.count("other", f"{type(exn).__name__}: {exn}")
        return True

    def take(self) -> torch.Tensor:
        """Counts since the previous call, as LongTensor[len(SKIP_REASONS)]."""
        counts = torch.tensor(self.pending, dtype=torch.long)
        self.pending = [0] * len(SKIP_REASONS)
        return counts


class Collate:
    """Stack per-sample tensors into a batch dict and attach this worker's pending skip counts."""

    def __init__(self, counter: SkipCounter) -> None:
        self.counter = counter

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0] if key != "__key__"}
        batch[SKIPPED_KEY] = self.counter.take()
        return trim_text_ids(batch)


def trim_text_ids(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut every text-id tensor of a host batch to one common length: the longest real row, rounded up to 8.

    Done here, on the host, so the training step never has to read the length back from the device; the
    text views keep one length, so they still encode in one call.
    """
    keys = [key for key in TEXT_ID_KEYS if key in batch]
    if keys:
        length = padded_length(*(batch[key] for key in keys))
        batch.update({key: batch[key][:, :length] for key in keys})
    return batch


def read_shards(
    sources: Iterable[dict[str, Any]], counter: SkipCounter, expected: dict[str, int] | None = None
) -> Iterator[dict[str, Any]]:
    """`{"url"}` dicts -> tar member dicts, `{}` after each shard. A shard that cannot be opened or read to
    its end (missing, truncated, corrupt) counts one `bad_tar`; the members read before the error are kept.
    `expected`: samples per shard (`ShardSet.sizes`); a shard read to its end with fewer samples counts the
    missing ones as `short_shard` (a tar cut at a member boundary otherwise reads as a valid, shorter tar)."""
    expected = expected or {}
    for source in sources:
        url = source["url"]
        samples, last_key = 0, None
        try:
            stream = wds.gopen(url)
            try:
                for member in wds.tariterators.tar_file_iterator(stream):
                    key = wds.tariterators.base_plus_ext(member["fname"])[0]
                    if key is not None and key != last_key:
                        samples, last_key = samples + 1, key
                    member["__url__"] = url
                    yield member
            finally:
                stream.close()
        except Exception as exn:
            counter.count("bad_tar", f"{url}: {type(exn).__name__}: {exn}")
        wanted = expected.get(shard_key(url), 0)
        if samples < wanted:
            message = f"{url}: holds {samples} of the {wanted} samples its index lists"
            counter.count("short_shard", message, samples=wanted - samples)
        yield {}


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def shard_key(url: str) -> str:
    """How shard sizes are keyed: the canonical path of a local shard, the url itself of a remote one."""
    return url if _is_remote(url) else os.path.realpath(url)


def _indexed_sizes(urls: list[str], split: str) -> dict[str, int]:
    """`{shard_key: samples}` from the `{split}.json` index (written by `data_recipes`) beside each local
    shard, for the shards it lists; however the shards were named (directory, list, pattern)."""
    sizes: dict[str, int] = {}
    folders = {os.path.dirname(shard_key(url)) for url in urls if not _is_remote(url)}
    for folder in sorted(folders):
        index = Path(folder) / f"{split}.json"
        if index.is_file():
            sizes.update(_read_index(str(index), f"{split} index").sizes)
    return sizes


def skip_metrics(batch: dict[str, torch.Tensor], prefix: str = "data/skipped_") -> dict[str, torch.Tensor]:
    """`{prefix + reason: count}` from `batch["skipped"]`, ready for `self.log_dict(..., reduce_fx="sum")`."""
    counts = batch[SKIPPED_KEY]
    return {prefix + reason: counts[i] for i, reason in enumerate(SKIP_REASONS)}


def normalize_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """uint8 `image` / `image_view2` -> normalised float32 (the agreed batch format); float ones unchanged."""
    for key in IMAGE_KEYS:
        if key in batch and batch[key].dtype == torch.uint8:
            batch[key] = normalize_uint8(batch[key])
    return batch


class ShardSet(NamedTuple):
    """Resolved shards: their urls, the samples their index counts (None without an index), and
    `{shard_key: samples}` for the shards an index lists (to catch short shards)."""

    urls: list[str]
    samples: int | None
    sizes: dict[str, int]


def _read_index(source: str, name: str) -> ShardSet:
    """The shards a `data_recipes` index (`{split}.json`, a local file or an http(s) url) lists beside it."""
    remote = _is_remote(source)
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
        return _read_index(str(index), name)
    urls = sorted(glob.glob(str(folder / f"{split}-*.tar")))
    return _without_index(urls, split) if urls else None


def _split_source(folder: Path, split: str) -> str:
    """How to name the `split` shards of `folder` alone: its index, else the shard glob."""
    index = folder / f"{split}.json"
    return str(index) if index.is_file() else str(folder / f"{split}-*.tar")


def _directory_shards(folder: Path, split: str, name: str) -> ShardSet:
    """The `split` shards of `folder`; for a validation split it lacks, those of its only other validation
    split (`VALIDATION_SPLITS`), if it has exactly one."""
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
    `"data.train_shards='data/train-{000000..000009}.tar'"`.
    """
    if isinstance(spec, list | tuple):
        parts = [resolve_shards(s, split, name) for s in spec]
        urls = [url for part in parts for url in part.urls]
        counts = [part.samples for part in parts]
        sizes = {key: n for part in parts for key, n in part.sizes.items()}
        return ShardSet(urls, None if None in counts else sum(counts), sizes)
    spec = str(spec)
    if spec.endswith(".json"):
        if spec.startswith("pipe:") or ("://" in spec and not spec.startswith(("http://", "https://"))):
            raise ValueError(f"{name}: a shard index is read from a local file or an http(s) url, not {spec}")
        shards = _read_index(spec if _is_remote(spec) else str(Path(spec).expanduser()), name)
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
        return _without_index(urls, split)
    if _is_remote(spec):
        return ShardSet(list(wds.shardlists.expand_urls(spec)), None, {})
    urls = [u for pattern in wds.shardlists.expand_urls(spec) for u in sorted(glob.glob(pattern))]
    if not urls:
        raise FileNotFoundError(f"{name}: no shards match {spec}")
    return _without_index(urls, split)


def _with_final_skips(src: Iterable[dict[str, torch.Tensor]], counter: SkipCounter) -> Iterator[dict]:
    """The batches of `src`, then `{SKIPPED_KEY: counts}` if samples were skipped after the last one."""
    yield from src
    pending = counter.take()
    if pending.any():
        yield {SKIPPED_KEY: pending}


def _rank_and_world(trainer: Any) -> tuple[int, int]:
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _DataEpoch:
    """Where a training loader's next pass starts: its epoch, the batches of it already trained and the
    samples each stream had read by then (`UNKNOWN` if not known). Shared with the loader's worker processes
    (set in the main process before each pass)."""

    def __init__(self, streams: int) -> None:
        self._epoch = multiprocessing.Value("i", -1, lock=False)
        self._done = multiprocessing.Value("q", 0, lock=False)
        self._read = multiprocessing.Array("q", [UNKNOWN] * streams, lock=False)

    @property
    def epoch(self) -> int:
        return self._epoch.value

    @property
    def done(self) -> int:
        return self._done.value

    def read(self, stream: int) -> int:
        return self._read[stream]

    def set(self, epoch: int, done: int = 0, read: list[int] | None = None) -> None:
        self._epoch.value, self._done.value = epoch, done
        self._read[:] = read or [UNKNOWN] * len(self._read)


def _worker() -> tuple[int, int]:
    """(this loader worker's id, the number of workers); (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class _EpochStream(IterableDataset):
    """The training stream of each (rank, worker): every epoch a function of (seed, epoch, rank, worker).

    `samples` runs the decoded-sample `pipeline` (built with `start` after the shard source and `positions`
    after the sample shuffle) as often as needed; the chained passes are cut into the worker's `per_worker`
    batches of `batch_size`, put together by `collate`. `start` seeds the shard and sample shuffles from
    (seed, epoch, repetition, rank, stream). `positions` drops the samples of the batches this worker already
    gave in the epoch, before they are decoded, and tags each sample with its own seed, which `_Seeded` puts
    into `random` (augmentations, text views) before its transform. The samples to drop are those the stream
    had read by its last trained batch (`position.read`); when that is not known, `done` full batches.

    The loader asks its workers for batches round robin, starting with worker 0, so batch `i` of an epoch is
    batch `i // workers` of the stream `i % workers`. A pass that starts after `done` batches hands the
    stream `(w + done) % workers` to the loader's worker `w`: its batches then continue the epoch in the
    uninterrupted order, which stays true however often the epoch is resumed. `split` gives each stream its
    shards by the trainer's rank and world size (webdataset cannot see them inside loader workers).

    A resampled shard source never ends, so a pass over it never shows that no shard gives a sample:
    `drawn` counts the shard draws since a sample last came through (`barren`) and stops the stream with
    `NoUsableSample` when they pass `draw_limit` (see `barren_draw_limit`).
    """

    def __init__(
        self, seed: int, rank: int, world: int, batch_size: int, per_worker: int, workers: int
    ) -> None:
        self.seed, self.rank, self.world, self.batch_size = seed, rank, world, batch_size
        self.per_worker, self.workers = per_worker, workers
        self.position = _DataEpoch(workers)
        self.rngs = {"shards": random.Random(), "samples": random.Random()}
        self.pipeline: wds.DataPipeline | None = None
        self.collate: Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]] | None = None
        self.name, self.stream_id, self.repetition, self.index, self.skip = "", 0, 0, 0, 0
        self.draw_limit: int | None = None
        self.barren = 0

    def __len__(self) -> int:
        return self.per_worker * self.workers

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker, workers = _worker()
        self.stream_id = (worker + self.position.done) % workers
        done = len(range(self.stream_id, self.position.done, workers))
        read = self.position.read(self.stream_id) if done else 0
        self.skip = read if read != UNKNOWN else done * self.batch_size
        self.index, self.repetition, self.barren = 0, 0, 0
        samples = self.samples()
        for _ in range(self.per_worker - done):
            batch = self.collate([next(samples) for _ in range(self.batch_size)])
            batch[STREAM_READ_KEY] = torch.tensor([self.stream_id, self.index])
            yield batch

    def samples(self) -> Iterator[dict[str, Any]]:
        """Decoded samples of the epoch: passes over the worker's shards, chained."""
        while True:
            given, before = 0, self.index
            for sample in self.pipeline:
                given, self.barren = given + 1, 0
                yield sample
            if given == 0 and (self.index == before or before >= self.skip):  # it would never end
                raise NoUsableSample("train_shards: a pass over this worker's shards gave no usable sample")
            self.repetition += 1

    def start(self, src: Iterable[Any]) -> Iterator[Any]:
        self.name = f"{self.seed}:{self.position.epoch}:{self.repetition}:{self.rank}:{self.stream_id}"
        for kind, rng in self.rngs.items():
            rng.seed(f"{kind}:{self.name}")
        yield from src

    def split(self, src: Iterable[dict[str, str]]) -> Iterator[dict[str, str]]:
        """The shards of this rank (every `world`-th from `rank`), then of this stream among its workers."""
        yield from _share(src, self.rank, self.world, self.stream_id, self.workers)

    def drawn(self, src: Iterable[dict[str, str]]) -> Iterator[dict[str, str]]:
        """The shard draws, stopped with `NoUsableSample` after `draw_limit` in a row gave no sample."""
        for shard in src:
            self.barren += 1
            if self.draw_limit is not None and self.barren > self.draw_limit:
                raise NoUsableSample(
                    f"train_shards: {self.draw_limit} shards drawn in a row gave no usable sample (every "
                    "shard corrupt, or no sample with an image and a caption)"
                )
            yield shard

    def positions(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in src:
            self.index += 1
            if self.index <= self.skip:
                self.barren = 0  # trained before the resume: usable, not decoded again
            else:
                sample[SAMPLE_SEED_KEY] = f"sample:{self.name}:{self.index}"
                yield sample


class _Seeded:
    """A sample transform run with `random` seeded by the sample's own seed."""

    def __init__(self, transform: Callable[[dict[str, Any]], Any]) -> None:
        self.transform = transform

    def __call__(self, sample: dict[str, Any]) -> Any:
        random.seed(sample.pop(SAMPLE_SEED_KEY))
        return self.transform(sample)


def _resampled_shards(urls: list[str], rng: random.Random) -> Iterator[dict[str, str]]:
    """Shards drawn with replacement, forever."""
    while True:
        yield {"url": rng.choice(urls)}


class _EpochLoader(DataLoader):
    """A DataLoader that tells its workers where each pass starts.

    `position(len)` gives (epoch, batches of it already trained, samples each stream had read by then) when a
    trainer drives the loader: the pass reads that epoch's stream without those batches, so a resumed run
    continues where the interrupted one stopped. Without a trainer each pass reads the next epoch from its
    start.

    A pass starts at its first batch, not when the iterator is made: Lightning makes the training iterator
    before it restores a resumed run's loop state when the module asks for `estimated_stepping_batches`
    (as the lr schedule does), and only the restored state says where the pass starts.
    """

    def __init__(
        self, stream: _EpochStream, position: Callable[[int], tuple[int, int, list[int]] | None], **kw: Any
    ) -> None:
        super().__init__(stream, **kw)
        self.position = position

    def __iter__(self) -> Iterator[Any]:
        return _StartingAtFirstBatch(self._start)

    def _start(self) -> Iterator[Any]:
        where = self.dataset.position
        where.set(*(self.position(len(self)) or (where.epoch + 1, 0)))
        return super().__iter__()


class _StartingAtFirstBatch:
    """An iterator that calls `start` for the real one when its first item is asked for."""

    def __init__(self, start: Callable[[], Iterator[Any]]) -> None:
        self._start = start
        self._iterator: Iterator[Any] | None = None

    def __iter__(self) -> _StartingAtFirstBatch:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._start()
        return next(self._iterator)


def _trainer_position(trainer: Any, batches: int) -> tuple[int, int] | None:
    """(epoch, batches of it already trained) that a Lightning trainer is about to run; None without one."""
    fit_loop = getattr(trainer, "fit_loop", None)
    if fit_loop is None:
        return None
    epoch = trainer.current_epoch
    done = fit_loop.epoch_loop.batch_progress.current.processed  # restored from a checkpoint, else 0
    limit = trainer.limit_train_batches
    planned = min(batches, int(limit)) if isinstance(limit, int) else int(batches * limit)
    if done >= planned:  # restored from the end of an epoch: the next one starts
        return epoch + 1, 0
    return epoch, done


def check_augment(augment: dict[str, Any] | None, image_size: int) -> dict[str, Any]:
    """`augment` as a dict of `TrainViews` arguments, checked here rather than in the loader workers."""
    augment = dict(augment or {})
    parameters = inspect.signature(TrainViews).parameters
    known = set(parameters) - {"image_size", "num_views", "normalize"}
    unknown = sorted(set(augment) - known)
    if unknown:
        names = ", ".join(sorted(known))
        raise ValueError(f"augment: unknown field(s) {', '.join(unknown)} (known: {names})")
    for name, value in augment.items():
        default = parameters[name].default
        size = len(default) if isinstance(default, tuple) else 0
        sequence = isinstance(value, Sequence) and not isinstance(value, str)
        numbers = list(value) if size and sequence else [value]
        wanted = f"{size} numbers" if size else "a number"
        if (size and len(numbers) != size) or any(
            isinstance(x, bool) or not isinstance(x, int | float) for x in numbers
        ):
            raise ValueError(f"augment.{name}: expected {wanted}, got {value!r}")
    try:
        TrainViews(image_size=image_size, **augment)
    except (TypeError, ValueError, IndexError) as err:
        raise ValueError(f"augment: {err}") from None
    return augment


class MultiViewDataModule(L.LightningDataModule):
    """Multi-view training batches (and single-view validation batches) from WebDataset shards.

    Args (plain types, Hydra-friendly):
        train_shards: directory / index (.json, path or http(s) url) / list file / brace pattern / glob /
            list (see `resolve_shards`).
        vocab_file: ERNIE `vocab.txt`.
        val_shards: same forms; optional. Validation uses the eval-style center view, no text view.
        epoch_samples: samples per (virtual) epoch over all ranks; default: the `{split}.json` count.
        resampled: draw shards with replacement (infinite stream; recommended for multi-node).
        views: `ViewConfig` fields (image_view2, tags, text_view, token_drop_p).
        augment: `TrainViews` keyword arguments (scale, flip_p, jitter_p, ...).
        max_image_pixels: images whose header announces more pixels are skipped (`image_too_large`).
        uint8_transfer: workers send uint8 images (4x less to copy between processes and to the GPU);
            `on_after_batch_transfer` normalises them on the device, so the LightningModule still gets
            float32. Iterating a loader outside Lightning: call `normalize_batch(batch)`.
    """

    def __init__(
        self,
        train_shards: str | list[str],
        vocab_file: str,
        val_shards: str | list[str] | None = None,
        image_size: int = 224,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        epoch_samples: int | None = None,
        shuffle_buffer: int = 2000,
        shard_shuffle: int = 100,
        resampled: bool = False,
        text_max_len: int = 48,
        views: ViewConfig | dict[str, Any] | None = None,
        augment: dict[str, Any] | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        pin_memory: bool = True,
        uint8_transfer: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        train_split: str = "train",
        val_split: str = "val",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not Path(vocab_file).is_file():
            raise FileNotFoundError(f"vocab_file: {vocab_file} not found")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be 0 (load in this process) or more, got {num_workers}")
        if epoch_samples is not None and epoch_samples < 1:
            raise ValueError(f"epoch_samples must be positive, got {epoch_samples}")
        train = resolve_shards(train_shards, train_split, "train_shards")
        val = resolve_shards(val_shards, val_split, "val_shards") if val_shards else None
        self.train_urls, self.val_urls = train.urls, val.urls if val else None
        self.shard_sizes = {**train.sizes, **(val.sizes if val else {})}
        self.epoch_samples = epoch_samples if epoch_samples is not None else train.samples
        if not self.epoch_samples or self.epoch_samples < 1:
            raise ValueError(
                f"epoch_samples: set it to a positive number (no {train_split}.json sample count for "
                f"train_shards={train_shards})"
            )
        self.vocab_file = str(vocab_file)
        self.image_size = image_size
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.shard_shuffle = shard_shuffle
        self.resampled = resampled
        self.text_max_len = text_max_len
        self.views = ViewConfig.of(views)
        self.augment = check_augment(augment, image_size)
        self.max_image_pixels = max_image_pixels
        self.pin_memory = pin_memory
        self.uint8_transfer = uint8_transfer
        self.persistent_workers = persistent_workers
        self.prefetch_factor = prefetch_factor
        self.seed = seed
        self._read_epoch = UNKNOWN  # the epoch `_read` belongs to
        self._read: list[int] = []  # per stream of this rank: samples read by its last trained batch

    def batches_per_worker(self, world_size: int) -> int:
        """Training batches each worker yields per epoch (at least 1)."""
        per_rank = max(1, self.epoch_samples // (self.batch_size * world_size))
        return math.ceil(per_rank / max(1, self.num_workers))

    def _transform(self, train: bool) -> SampleTransform:
        return SampleTransform(
            self.vocab_file,
            image_size=self.image_size,
            text_max_len=self.text_max_len,
            views=self.views,
            augment=self.augment,
            max_image_pixels=self.max_image_pixels,
            train=train,
            uint8_images=self.uint8_transfer,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Normalise uint8 images on the device (Lightning calls this after moving the batch)."""
        return normalize_batch(batch)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Note where the batch's stream stands (a host tensor: no device sync) and take the note off."""
        read = batch.pop(STREAM_READ_KEY, None) if isinstance(batch, dict) else None
        if read is not None:
            stream, samples = read.tolist()
            if stream < len(self._read):
                self._read[stream] = samples
        return batch

    def _position(self, batches: int) -> tuple[int, int, list[int]] | None:
        """(epoch, batches of it trained, samples each stream had read by then) for the next training pass."""
        where = _trainer_position(self.trainer, batches)
        if where is None:
            return None
        epoch, done = where
        streams = max(1, self.num_workers)
        if done == 0 or epoch != self._read_epoch or len(self._read) != streams:
            self._read_epoch, self._read = epoch, [UNKNOWN] * streams
        return epoch, done, list(self._read)

    def state_dict(self) -> dict[str, Any]:
        """Where each training stream of every rank stood after its last trained batch. Gathered from all
        ranks: every rank saves a checkpoint together (`Trainer.save_checkpoint`)."""
        _, world_size = _rank_and_world(self.trainer)
        read = self._read or [UNKNOWN] * max(1, self.num_workers)
        if world_size > 1:
            device = self.trainer.strategy.root_device
            gathered = self.trainer.strategy.all_gather(torch.tensor(read, device=device))
            reads = gathered.reshape(world_size, -1).tolist()
        else:
            reads = [read]
        return {"epoch": self._read_epoch, "stream_read": reads}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take this rank's streams from a checkpoint of the same ranks and workers (else: not known)."""
        rank, world_size = _rank_and_world(self.trainer)
        reads = state.get("stream_read") or []
        streams = max(1, self.num_workers)
        if len(reads) == world_size and len(reads[rank]) == streams:
            self._read_epoch, self._read = int(state["epoch"]), [int(r) for r in reads[rank]]

    def _loader(self, dataset: IterableDataset) -> DataLoader:
        """A loader over `dataset`; over a training stream, one that tells it where each pass starts."""
        workers = self.num_workers > 0
        if workers:
            # OpenCV's thread pool does not survive fork (a forked worker can hang on it): run OpenCV
            # single-threaded in this process, so forked workers start without a pool. Workers are the
            # parallelism here.
            cv2.setNumThreads(1)
        settings = {
            "batch_size": None,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.persistent_workers and workers,
            "prefetch_factor": self.prefetch_factor if workers else None,
            # a pass's worker seeds come from the loader's own generator, not torch's global one: starting a
            # pass then leaves the model's random draws (dropout) alone, as a resumed run needs them
            "generator": torch.Generator().manual_seed(self.seed),
            "worker_init_fn": ignore_stop_signals,
        }
        if isinstance(dataset, _EpochStream):
            return _EpochLoader(dataset, position=self._position, **settings)
        return DataLoader(dataset, **settings)

    def _pipeline(
        self, urls: list[str], counter: SkipCounter, stream: _EpochStream | None = None, rank: int = 0,
        world: int = 1,
    ) -> list[Callable]:
        """Shards -> tar members -> samples; `stream` (training) seeds the shard order at each pass and
        splits the shards; without one (validation) they are split by `rank` of `world`, then by worker."""
        if stream and self.resampled:
            draws = functools.partial(_resampled_shards, urls, stream.rngs["shards"])
            source = [draws, stream.start, stream.drawn]
        elif stream:
            source = [wds.SimpleShardList(urls), stream.start, stream.split]
            if self.shard_shuffle:
                source.append(wds.shuffle(self.shard_shuffle, self.shard_shuffle, rng=stream.rngs["shards"]))
        else:
            ours = functools.partial(_rank_and_worker_shards, rank=rank, world=world)
            source = [wds.SimpleShardList(urls), ours]
        return [
            *source,
            functools.partial(read_shards, counter=counter, expected=self.shard_sizes),
            functools.partial(wds.tariterators.group_by_keys, handler=counter.tar_handler),
        ]

    def train_dataloader(self) -> DataLoader:
        rank, world_size = _rank_and_world(self.trainer)
        streams = world_size * max(1, self.num_workers)
        if not self.resampled and len(self.train_urls) < streams:
            raise ConfigError(
                f"train_shards: {len(self.train_urls)} shards for {world_size} ranks x {self.num_workers} "
                "workers; every worker needs a shard (set resampled=true or use fewer workers)"
            )
        counter = SkipCounter()
        per_worker = self.batches_per_worker(world_size)
        workers = max(1, self.num_workers)
        trained = per_worker * workers * self.batch_size * world_size
        if trained != self.epoch_samples and rank == 0:
            log.info("an epoch trains %d samples: epoch_samples=%d rounded to %d batches of %d for each of "
                     "%d loader worker(s) on %d rank(s)", trained, self.epoch_samples, per_worker,
                     self.batch_size, workers, world_size)
        stream = _EpochStream(self.seed, rank, world_size, self.batch_size, per_worker, workers)
        if self.resampled:
            stream.draw_limit = barren_draw_limit(len(self.train_urls))
        samples = stream.rngs["samples"]
        shuffle = [wds.shuffle(self.shuffle_buffer, rng=samples)] if self.shuffle_buffer > 0 else []
        stream.pipeline = wds.DataPipeline(
            *self._pipeline(self.train_urls, counter, stream),
            *shuffle,
            stream.positions,
            wds.map(_Seeded(self._transform(train=True)), handler=counter.sample_handler),
        )
        stream.collate = Collate(counter)
        return self._loader(stream)

    def val_dataloader(self) -> DataLoader | list:
        """One pass over this rank's share of the validation shards (see the module docstring)."""
        if not self.val_urls:
            return []
        rank, world_size = _rank_and_world(self.trainer)
        counter = SkipCounter()
        dataset = wds.DataPipeline(
            *self._pipeline(self.val_urls, counter, rank=rank, world=world_size),
            wds.map(self._transform(train=False), handler=counter.sample_handler),
            wds.batched(self.val_batch_size, collation_fn=Collate(counter), partial=True),
            functools.partial(_with_final_skips, counter=counter),
        )
        return self._loader(dataset)
