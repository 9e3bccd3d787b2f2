"""The training stream: fixed-length virtual epochs, each a function of (seed, epoch, rank, worker), that a
resumed pass continues exactly, and that stops with a one-line error when no shard gives a usable sample."""

from __future__ import annotations

import functools
import itertools
import random
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from ernievil2_train.config_checks import ConfigError
from ernievil2_train.data import epochs
from ernievil2_train.data.batches import SKIPPED_KEY, Collate, SkipCounter
from ernievil2_train.data.decode import SKIP_REASONS, parse_sample
from ernievil2_train.data.epochs import (
    SAMPLE_SEED_KEY,
    STREAM_READ_KEY,
    UNKNOWN,
    EpochLoader,
    EpochStream,
    NoUsableSample,
    Seeded,
    rank_and_worker_shards,
    resampled_shards,
    trainer_position,
)
from ernievil2_train.data.sources import read_shards
from tests.data.shard_helpers import error_within, sample, write_shard

PER_SHARD = 6
NO_SAMPLE = "NoUsableSample: train_shards: a pass over this worker's shards gave no usable sample"


def corrupt(index: int) -> dict:
    return {**sample(index), "jpg": b"not a jpeg"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """`a`, `b`: good samples 0-5 and 6-11; `mixed`: samples 20-29, one in three corrupt; `corrupt`: only
    corrupt samples; `empty`: no sample; `one`: good sample 40 alone."""
    root = tmp_path_factory.mktemp("epochs")
    contents = {
        "a": [sample(i) for i in range(PER_SHARD)],
        "b": [sample(i) for i in range(PER_SHARD, 2 * PER_SHARD)],
        "mixed": [corrupt(i) if i % 3 == 1 else sample(i) for i in range(20, 30)],
        "corrupt": [corrupt(i) for i in range(30, 34)],
        "empty": [],
        "one": [sample(40)],
    }
    return {name: str(write_shard(root / f"{name}.tar", items)) for name, items in contents.items()}


def numbered(item: dict) -> dict[str, torch.Tensor]:
    """The sample's number (its image header checked) and a draw from `random`."""
    raw = parse_sample(item)
    return {"index": torch.tensor(int(raw.key[1:])), "draw": torch.tensor(random.random())}


def training_stream(
    urls: list[str] | None = None, *, draws: Any = None, seed: int = 0, batch_size: int = 2,
    per_worker: int = 3, workers: int = 1, rank: int = 0, world: int = 1, shuffle: int = 4,
    draw_limit: int | None = None, decoded: list[int] | None = None,
) -> EpochStream:
    """An `EpochStream` over `urls` (split by rank and stream), or over the shard `draws(stream)` gives, built
    as the data module builds it, with `numbered` as the sample transform (`decoded` lists its samples)."""
    stream = EpochStream(seed, rank, world, batch_size, per_worker, workers)
    stream.draw_limit = draw_limit
    counter = SkipCounter()
    if draws is None:
        source = [wds.SimpleShardList(urls), stream.start, stream.split]
    else:
        source = [functools.partial(draws, stream), stream.start, stream.drawn]

    def transform(item: dict) -> dict[str, torch.Tensor]:
        if decoded is not None:
            decoded.append(int(item["__key__"][1:]))
        return numbered(item)

    stream.pipeline = wds.DataPipeline(
        *source,
        functools.partial(read_shards, counter=counter),
        functools.partial(wds.tariterators.group_by_keys, handler=counter.tar_handler),
        *([wds.shuffle(shuffle, rng=stream.rngs["samples"])] if shuffle else []),
        stream.positions,
        wds.map(Seeded(transform), handler=counter.sample_handler),
    )
    stream.collate = Collate(counter)
    return stream


def run(stream: EpochStream, epoch: int, done: int = 0, read: list[int] | None = None) -> list[dict]:
    """The batches of `epoch` that `stream` gives after `done` batches (streams had read `read` samples)."""
    stream.position.set(epoch, done, read)
    return list(stream)


def same(a: list[dict], b: list[dict]) -> bool:
    keys = ("index", "draw", STREAM_READ_KEY)
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in keys)


def indices(batches: list[dict]) -> list[int]:
    return torch.cat([b["index"] for b in batches]).tolist()


def test_a_pass_gives_its_batches_each_saying_where_its_stream_stood(shards: dict[str, str]) -> None:
    """`stream_read` counts the samples read by the end of each batch, the skipped ones included."""
    stream = training_stream([shards["mixed"]], per_worker=3, batch_size=2, shuffle=0)
    assert len(stream) == 3
    batches = run(stream, 0)
    assert indices(batches) == [20, 21, 23, 24, 26, 27]
    assert [b[STREAM_READ_KEY].tolist() for b in batches] == [[0, 2], [0, 5], [0, 8]]
    assert all(b["index"].shape == (2,) for b in batches)
    skipped = sum(b[SKIPPED_KEY] for b in batches)
    assert skipped[SKIP_REASONS.index("bad_image")] == 2 and int(skipped.sum()) == 2


def test_an_epoch_longer_than_the_shards_repeats_them_reshuffled(shards: dict[str, str]) -> None:
    """18 samples from 12: the first pass gives each sample once, the next one reads them again in
    another order, with other augmentation draws."""
    batches = run(training_stream([shards["a"], shards["b"]], per_worker=9, batch_size=2), 0)
    seen = indices(batches)
    assert len(batches) == 9 and sorted(seen[:12]) == list(range(12))
    assert seen[12:] != seen[:6] and set(seen[12:]) <= set(range(12))
    draws = {int(i): float(d) for b in batches[:6] for i, d in zip(b["index"], b["draw"], strict=True)}
    assert len(set(draws.values())) == 12
    again = [(int(i), float(d)) for b in batches[6:] for i, d in zip(b["index"], b["draw"], strict=True)]
    assert all(draws[i] != d for i, d in again)


@pytest.mark.parametrize("resampled", [False, True])
def test_a_pass_is_a_function_of_seed_and_epoch(shards: dict[str, str], resampled: bool) -> None:
    urls = [shards["a"], shards["b"]]

    def make(seed: int) -> EpochStream:
        if resampled:
            return training_stream(draws=lambda s: resampled_shards(urls, s.rngs["shards"]), seed=seed)
        return training_stream(urls, seed=seed)

    first = run(make(0), 2)
    assert same(run(make(0), 2), first)
    assert not same(run(make(0), 3), first)
    assert not same(run(make(1), 2), first)
    stream = make(0)
    assert same(run(stream, 3), run(make(0), 3)) and same(run(stream, 2), first)


@pytest.mark.parametrize("done", [1, 2, 4])
def test_a_resumed_pass_gives_the_rest_of_the_epoch_exactly(shards: dict[str, str], done: int) -> None:
    """From where the stream stood after its last trained batch, corrupt samples read before it included:
    the remaining batches, with their draws, are the uninterrupted pass's, and only their samples are
    decoded again."""
    urls = [shards["mixed"], shards["a"]]
    full = run(training_stream(urls, per_worker=5), 1)
    read = int(full[done - 1][STREAM_READ_KEY][1])
    decoded: list[int] = []
    resumed = run(training_stream(urls, per_worker=5, decoded=decoded), 1, done, [read])
    assert same(resumed, full[done:])
    assert len(decoded) == int(full[-1][STREAM_READ_KEY][1]) - read
    assert set(decoded) >= set(indices(full[done:]))


def test_without_what_was_read_a_resume_drops_whole_batches(shards: dict[str, str]) -> None:
    """A checkpoint of another layout says nothing of the streams: the pass drops `done` full batches."""
    full = run(training_stream([shards["a"], shards["b"]], per_worker=5), 0)
    assert same(run(training_stream([shards["a"], shards["b"]], per_worker=5), 0, 3, [UNKNOWN]), full[3:])
    assert same(run(training_stream([shards["a"], shards["b"]], per_worker=5), 0, 3), full[3:])


def test_a_resume_past_a_whole_pass_reads_on_into_the_next(shards: dict[str, str]) -> None:
    """Resumed 14 samples into an epoch over 12: the first pass is all dropped, which is no error."""
    full = run(training_stream([shards["a"], shards["b"]], per_worker=9), 0)
    resumed = run(training_stream([shards["a"], shards["b"]], per_worker=9), 0, 7, [14])
    assert same(resumed, full[7:])


@pytest.mark.parametrize("names", [["corrupt"], ["empty"], ["corrupt", "empty"]])
def test_shards_without_a_usable_sample_stop_the_stream_with_a_one_line_error(
    shards: dict[str, str], names: list[str]
) -> None:
    """Repeating such shards would never fill a batch: the pass that gives nothing ends the stream."""
    stream = training_stream([shards[name] for name in names])
    assert error_within(lambda: run(stream, 0), seconds=30) == NO_SAMPLE
    resumed = training_stream([shards[name] for name in names])
    assert error_within(lambda: run(resumed, 0, 1, [6]), seconds=30) == NO_SAMPLE
    assert issubclass(NoUsableSample, ConfigError)


def cycled(*names: str, shards: dict[str, str]) -> Any:
    """Shard draws that go round `names` in order, forever."""
    return lambda stream: itertools.cycle([{"url": shards[name]} for name in names])


def test_draws_stop_after_the_limit_in_a_row_without_a_usable_sample(shards: dict[str, str]) -> None:
    """Two corrupt draws and a good one are within a limit of 3 draws (every sample starts the count
    again), not within a limit of 2; a resumed pass's dropped samples count as usable."""
    draws = cycled("corrupt", "corrupt", "one", shards=shards)
    assert indices(run(training_stream(draws=draws, draw_limit=3, shuffle=0), 0)) == [40] * 6
    limited = training_stream(draws=draws, draw_limit=2, shuffle=0)
    assert error_within(lambda: run(limited, 0), seconds=30) == (
        "NoUsableSample: train_shards: 2 shards drawn in a row gave no usable sample (every shard corrupt, "
        "or no sample with an image and a caption)"
    )
    alternating = cycled("corrupt", "one", shards=shards)
    full = run(training_stream(draws=alternating, draw_limit=2, shuffle=0, per_worker=5), 0)
    resumed = training_stream(draws=alternating, draw_limit=2, shuffle=0, per_worker=5)
    assert same(run(resumed, 0, 3, [int(full[2][STREAM_READ_KEY][1])]), full[3:])


def test_resampled_shards_are_drawn_with_replacement_from_their_generator() -> None:
    urls = [f"shard-{i}.tar" for i in range(4)]
    drawn = [d["url"] for d in itertools.islice(resampled_shards(urls, random.Random(1)), 200)]
    assert set(drawn) == set(urls) and len(drawn) == 200
    assert drawn == [d["url"] for d in itertools.islice(resampled_shards(urls, random.Random(1)), 200)]
    assert drawn != [d["url"] for d in itertools.islice(resampled_shards(urls, random.Random(2)), 200)]


def test_a_seeded_transform_sees_random_seeded_by_its_sample_and_not_the_seed() -> None:
    seen: list[dict] = []
    seeded = Seeded(lambda item: seen.append(item) or (random.random(), random.random()))
    first = seeded({"x": 1, SAMPLE_SEED_KEY: "sample:0:0:0:0:0:1"})
    random.seed(99)
    assert seeded({"x": 1, SAMPLE_SEED_KEY: "sample:0:0:0:0:0:1"}) == first
    assert seeded({"x": 1, SAMPLE_SEED_KEY: "sample:0:0:0:0:0:2"}) != first
    assert first[0] != first[1]
    assert seen == [{"x": 1}] * 3


def test_the_draw_limit_grows_with_the_shards() -> None:
    assert epochs.barren_draw_limit(1) == epochs.barren_draw_limit(10) >= 200  # shuffle buffer fill
    assert epochs.barren_draw_limit(10_000) == 40_000


class _Shares(IterableDataset):
    """(loader worker, item) for the items `rank_and_worker_shards` gives each worker of `rank`."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def __iter__(self) -> Any:
        worker = torch.utils.data.get_worker_info()
        for item in rank_and_worker_shards(range(20), self.rank, self.world):
            yield worker.id if worker else None, item


def test_ranks_then_loader_workers_take_disjoint_shares_of_the_shards() -> None:
    assert list(rank_and_worker_shards(range(20), 1, 3)) == [1, 4, 7, 10, 13, 16, 19]
    shares: dict[tuple[int, int | None], list[int]] = {}
    for rank in (0, 1):
        for worker, item in DataLoader(_Shares(rank, 2), batch_size=None, num_workers=2):
            shares.setdefault((rank, worker), []).append(item)
    assert shares == {(0, 0): [0, 4, 8, 12, 16], (0, 1): [2, 6, 10, 14, 18],
                      (1, 0): [1, 5, 9, 13, 17], (1, 1): [3, 7, 11, 15, 19]}


def test_streams_of_ranks_and_workers_read_their_own_shards(shards: dict[str, str]) -> None:
    """Rank 1 of 2 takes the second and the fourth shard; of those, its stream 0 (of 2) reads the first."""
    urls = [shards["a"], shards["one"], shards["b"], shards["mixed"]]
    batches = run(training_stream(urls, rank=1, world=2, workers=2, per_worker=3, shuffle=0), 0)
    assert indices(batches) == [40] * 6


def loader(stream: EpochStream, answers: list[tuple[int, int, list[int]] | None], calls: list[int],
           **kw: Any) -> EpochLoader:
    """An `EpochLoader` whose position is the last of `answers` when asked (`calls` records `len`)."""
    return EpochLoader(stream, lambda batches: calls.append(batches) or answers[-1], batch_size=None, **kw)


def test_a_loader_without_a_position_reads_the_next_epoch_at_each_pass(shards: dict[str, str]) -> None:
    urls = [shards["a"], shards["b"]]
    calls: list[int] = []
    passes = loader(training_stream(urls), [None], calls)
    first, second = list(passes), list(passes)
    assert same(first, run(training_stream(urls), 0)) and same(second, run(training_stream(urls), 1))
    assert calls == [3, 3]


def test_a_pass_starts_where_the_position_says_at_its_first_batch(shards: dict[str, str]) -> None:
    """Lightning makes the iterator before it restores a resumed run's position: the position is asked for
    when the first batch is, not when the iterator is made."""
    urls = [shards["mixed"], shards["a"]]
    full = run(training_stream(urls, per_worker=5), 4)
    answers: list[tuple[int, int, list[int]] | None] = [None]
    calls: list[int] = []
    batches = iter(loader(training_stream(urls, per_worker=5), answers, calls))
    assert calls == []
    answers.append((4, 2, [int(full[1][STREAM_READ_KEY][1])]))
    assert same(list(batches), full[2:]) and calls == [5]


@pytest.mark.parametrize("done", [1, 2])
def test_loader_workers_resumed_mid_epoch_keep_the_epochs_batch_order(shards: dict[str, str],
                                                                       done: int) -> None:
    """Batch `i` of an epoch is batch `i // 2` of stream `i % 2`; after an odd number of batches the loader's
    worker 0 takes up stream 1, so the batches still come in the uninterrupted order. Persistent workers,
    started in an earlier pass, read the position set after them, corrupt samples read by stream 0 too."""
    urls = [shards["corrupt"], shards["a"], shards["mixed"], shards["b"]]
    calls: list[int] = []
    full = list(loader(training_stream(urls, workers=2, per_worker=3), [(2, 0, [UNKNOWN, UNKNOWN])], calls,
                       num_workers=2))
    assert len(full) == 6 and [int(b[STREAM_READ_KEY][0]) for b in full] == [0, 1] * 3
    read = [UNKNOWN, UNKNOWN]
    for batch in full[:done]:
        stream, samples = batch[STREAM_READ_KEY].tolist()
        read[stream] = samples
    assert read[0] > 2
    answers: list[tuple[int, int, list[int]] | None] = [(1, 0, [UNKNOWN, UNKNOWN])]
    passes = loader(training_stream(urls, workers=2, per_worker=3), answers, calls, num_workers=2,
                    persistent_workers=True)
    assert len(list(passes)) == 6
    answers.append((2, done, read))
    assert same(list(passes), full[done:])


def test_where_a_trainer_stands_gives_the_epoch_and_batches_to_resume_from() -> None:
    def trainer(epoch: int, processed: int, limit: float) -> SimpleNamespace:
        current = SimpleNamespace(processed=processed)
        progress = SimpleNamespace(batch_progress=SimpleNamespace(current=current))
        fit_loop = SimpleNamespace(epoch_loop=progress)
        return SimpleNamespace(fit_loop=fit_loop, current_epoch=epoch, limit_train_batches=limit)

    assert trainer_position(None, 8) is None and trainer_position(SimpleNamespace(), 8) is None
    assert trainer_position(trainer(2, 0, 1.0), 8) == (2, 0)
    assert trainer_position(trainer(2, 5, 1.0), 8) == (2, 5)
    assert trainer_position(trainer(2, 8, 1.0), 8) == (3, 0)  # saved at the end of epoch 2
    assert trainer_position(trainer(2, 2, 3), 8) == (2, 2)
    assert trainer_position(trainer(2, 3, 3), 8) == (3, 0)  # limit_train_batches=3 ends epochs at 3
    assert trainer_position(trainer(2, 7, 20), 8) == (2, 7)
    assert trainer_position(trainer(2, 8, 20), 8) == (3, 0)
    assert trainer_position(trainer(2, 3, 0.5), 8) == (2, 3)
    assert trainer_position(trainer(2, 4, 0.5), 8) == (3, 0)


def test_a_lightning_trainer_is_read_where_it_keeps_its_progress() -> None:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_train_batches=5)
    assert trainer_position(trainer, 8) == (0, 0)
    trainer.fit_loop.epoch_loop.batch_progress.current.processed = 2
    assert trainer_position(trainer, 8) == (0, 2)
    trainer.fit_loop.epoch_loop.batch_progress.current.processed = 5
    assert trainer_position(trainer, 8) == (1, 0)
