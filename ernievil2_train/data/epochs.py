"""The training stream: virtual epochs of fixed length, each a function of (seed, epoch, rank, worker), that a
resumed run continues exactly.

Epochs are virtual: each worker yields `ceil(batches_per_rank / num_workers)` batches (the shard stream
repeats as needed), so every rank sees exactly `len(train_dataloader())` batches and DDP never waits on a
rank that ran out of data. Shards that give no usable sample at all stop the stream with `NoUsableSample`
instead of repeating forever: a pass over a worker's shards that gives none, or, resampling, more shard draws
in a row without one than `barren_draw_limit` allows.

Every pass is a function of (seed, epoch, rank, worker): the shard order, the sample shuffle and the
augmentations are seeded from them (each sample's augmentations by its own seed). A resumed run reads what the
uninterrupted run would have read: the next epoch after an epoch-end checkpoint; after a mid-epoch one, the
interrupted epoch's stream without the batches already trained (their samples are read, not decoded). Each
training batch carries `batch["stream_read"]` = (stream, samples that stream had read when the batch was
complete, skipped ones included); the datamodule takes it off before the device transfer and keeps, in the
checkpoint, where every stream of every rank stood after its last trained batch, so samples skipped before
the checkpoint do not shift the resumed stream.
"""

from __future__ import annotations

import itertools
import multiprocessing
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from ernievil2_train.config_checks import ConfigError

BARREN_DRAWS_MIN = 256  # above the shuffle buffer's first fill (at most 100 samples, so 100 draws)
BARREN_DRAWS_PER_SHARD = 4
SAMPLE_SEED_KEY = "__seed__"
STREAM_READ_KEY = "stream_read"
UNKNOWN = -1


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


def stream_samples(shard_samples: list[int], world: int, workers: int) -> list[int]:
    """Samples the shards of each training stream hold (rank-major, then worker), from each shard's count in
    shard-list order: how `EpochStream.split` shares the shards out."""
    return [sum(_share(shard_samples, rank, world, worker, workers))
            for rank in range(world) for worker in range(workers)]


def rank_and_worker_shards(src: Iterable[Any], rank: int, world: int) -> Iterator[Any]:
    """The shards of `rank` among `world`, then of this loader worker among the loader's workers."""
    worker, workers = _worker()
    yield from _share(src, rank, world, worker, workers)


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


class EpochStream(IterableDataset):
    """The training stream of each (rank, worker): every epoch a function of (seed, epoch, rank, worker).

    `samples` runs the decoded-sample `pipeline` (built with `start` after the shard source and `positions`
    after the sample shuffle) as often as needed; the chained passes are cut into the worker's `per_worker`
    batches of `batch_size`, put together by `collate`. `start` seeds the shard and sample shuffles from
    (seed, epoch, repetition, rank, stream). `positions` drops the samples of the batches this worker already
    gave in the epoch, before they are decoded, and tags each sample with its own seed, which `Seeded` puts
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

    def replaying(self) -> bool:
        """Whether the samples being read are ones the epoch trained before a resume (they are dropped)."""
        return self.index < self.skip

    def positions(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in src:
            self.index += 1
            if self.index <= self.skip:
                self.barren = 0  # trained before the resume: usable, not decoded again
            else:
                sample[SAMPLE_SEED_KEY] = f"sample:{self.name}:{self.index}"
                yield sample


class Seeded:
    """A sample transform run with `random` seeded by the sample's own seed."""

    def __init__(self, transform: Callable[[dict[str, Any]], Any]) -> None:
        self.transform = transform

    def __call__(self, sample: dict[str, Any]) -> Any:
        random.seed(sample.pop(SAMPLE_SEED_KEY))
        return self.transform(sample)


def resampled_shards(urls: list[str], rng: random.Random) -> Iterator[dict[str, str]]:
    """Shards drawn with replacement, forever."""
    while True:
        yield {"url": rng.choice(urls)}


class EpochLoader(DataLoader):
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
        self, stream: EpochStream, position: Callable[[int], tuple[int, int, list[int]] | None], **kw: Any
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


def batches_trained(trainer: Any) -> int | None:
    """Batches of its current epoch a Lightning trainer has trained (restored from a checkpoint, else
    counted); None without a trainer."""
    fit_loop = getattr(trainer, "fit_loop", None)
    return None if fit_loop is None else fit_loop.epoch_loop.batch_progress.current.processed


def within_an_epoch(trainer: Any) -> bool:
    """Whether the trainer stands within a training epoch: some of its batches trained and the epoch not
    ended, its last batch included (until the epoch's validation and end-of-epoch work are done, Lightning
    counts the batches trained, and with another batch count would train on in that epoch)."""
    if not batches_trained(trainer):  # no trainer, or no batch of the epoch trained yet
        return False
    progress = trainer.fit_loop.epoch_progress.current
    return progress.started > progress.processed


def trainer_position(trainer: Any, batches: int) -> tuple[int, int] | None:
    """(epoch, batches of it already trained) that a Lightning trainer is about to run; None without one."""
    done = batches_trained(trainer)
    if done is None:
        return None
    epoch = trainer.current_epoch
    limit = trainer.limit_train_batches
    planned = min(batches, int(limit)) if isinstance(limit, int) else int(batches * limit)
    if done >= planned:  # restored from the end of an epoch: the next one starts
        return epoch + 1, 0
    return epoch, done
