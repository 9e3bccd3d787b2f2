"""WebDataset LightningDataModule producing multi-view batches (the batch format is in the README).

Training stream per rank: shards (split by the trainer's rank, then by worker; or drawn with replacement)
-> sample shuffle buffer -> decode + views (`SampleTransform`) -> batches of `batch_size` collated inside the
worker -> `DataLoader(batch_size=None)`. Where shards come from: `sources`; virtual epochs and exact resume:
`epochs`; batches and their skip counts: `batches`.

Validation is one pass over the validation shards, split the same way: each rank reads every `world`-th
shard from its rank, and its loader workers share those (a rank or worker may get none). A worker that
skipped samples but gave no batch (all its samples were bad) ends with a batch holding only `skipped`, so
every skip is reported. Under a strategy that shards the parameters (FSDP) the ranks' passes run in step
(`lockstep`).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from ernievil2_train import distributed
from ernievil2_train.config_checks import ConfigError
from ernievil2_train.data.batches import Collate, SkipCounter, normalize_batch, with_final_skips
from ernievil2_train.data.decode import DEFAULT_MAX_IMAGE_PIXELS
from ernievil2_train.data.epochs import (
    STREAM_READ_KEY,
    UNKNOWN,
    EpochLoader,
    EpochStream,
    Seeded,
    barren_draw_limit,
    rank_and_worker_shards,
    resampled_shards,
    stream_samples,
    trainer_position,
    within_an_epoch,
)
from ernievil2_train.data.lockstep import Lockstep, shards_parameters
from ernievil2_train.data.sources import read_shards, resolve_shards, shard_key
from ernievil2_train.data.views import SampleTransform, ViewConfig
from ernievil2_train.stopping import ignore_stop_signals
from ernievil2_train.text.tokenizer import OFFICIAL_MAX_LEN, check_max_len
from ernievil2_train.text.vocab import SPECIAL_TOKENS, load_vocab
from ernievil2_train.vision.augment import TrainViews

log = logging.getLogger(__name__)


# a first batch with more [UNK] word pieces than this share is read with a vocabulary not made for its texts
UNKNOWN_SHARE_WARNING = 0.1
TEXT_KEYS_CHECKED = {"caption_ids": "caption", "tag_ids": "object tag"}


def unknown_share(ids: torch.Tensor, vocab: dict[str, int]) -> float | None:
    """The share of [UNK] among the word pieces of token id rows ([PAD], [CLS], [SEP] left out); None when
    the rows hold no word piece."""
    special = torch.tensor([vocab[token] for token in SPECIAL_TOKENS if token != "[UNK]"])
    pieces = int((~torch.isin(ids, special)).sum())
    return int((ids == vocab["[UNK]"]).sum()) / pieces if pieces else None


# streams whose shards hold samples within this share of each other (a few a recipe skipped) train alike
UNEVEN_STREAMS = 0.02
DATA_VOCAB_KEY = "vocab_file"  # in the state a checkpoint keeps: the vocabulary the data was tokenised with
LAYOUT_KEYS = {"processes": "trainer.devices x trainer.num_nodes (processes)",
               "num_workers": "data.datamodule.num_workers (loader workers in use)"}


def _check_same_layout(saved: dict[str, Any], here: dict[str, Any]) -> None:
    """`ConfigError` for the first layout setting a mid-epoch checkpoint was saved with that this run
    differs in (a checkpoint of an older version, without a layout, is let through)."""
    for key, value in saved.items():
        if key in here and here[key] != value:
            name = LAYOUT_KEYS.get(key, f"data.datamodule.{key}")
            what = "other shards than" if key == "train_shards" else f"{here[key]}, but {value} in"
            raise ConfigError(
                f"config key '{name}': {what} the checkpoint being resumed, which stopped within an "
                "epoch: the rest of that epoch can only be read as it was laid out; resume with the setting "
                "it was saved with, or start a new run folder"
            )


def _rank_and_world(trainer: Any) -> tuple[int, int]:
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    return distributed.world()


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


def _check_count(name: str, value: Any, low: int, wanted: str) -> None:
    """ValueError naming `name` unless `value` is None or an integer of at least `low`."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be {wanted}, got {value}")


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
        text_max_len: int = OFFICIAL_MAX_LEN,
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
        if Path(vocab_file).is_dir():
            raise FileNotFoundError(f"vocab_file: {vocab_file} is a folder, not a vocabulary file")
        if not Path(vocab_file).is_file():
            raise FileNotFoundError(f"vocab_file: {vocab_file} not found")
        positive = {"image_size": image_size, "batch_size": batch_size, "val_batch_size": val_batch_size,
                    "prefetch_factor": prefetch_factor, "epoch_samples": epoch_samples,
                    "max_image_pixels": max_image_pixels}
        for name, value in positive.items():
            _check_count(name, value, 1, "positive")
        _check_count("num_workers", num_workers, 0, "0 (load in this process) or more")
        for name, value in (("shuffle_buffer", shuffle_buffer), ("shard_shuffle", shard_shuffle)):
            _check_count(name, value, 0, "0 (no shuffling) or more")
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
        self._vocab: dict[str, int] | None = load_vocab(vocab_file)  # until the first batch is checked
        self.image_size = image_size
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.shard_shuffle = shard_shuffle
        self.resampled = resampled
        check_max_len(text_max_len, "text_max_len")
        self.text_max_len = text_max_len
        self.views = ViewConfig.from_any(views)
        self.augment = check_augment(augment, image_size)
        self.max_image_pixels = max_image_pixels
        self.pin_memory = pin_memory
        self.uint8_transfer = uint8_transfer
        self.persistent_workers = persistent_workers
        self.prefetch_factor = prefetch_factor
        self.seed = seed
        self._read_epoch = UNKNOWN  # the epoch `_read` belongs to
        self._read: list[int] = []  # per stream of this rank: samples read by its last trained batch

    def setup(self, stage: str) -> None:
        """Fewer loader workers when the training shards cannot give every worker of every rank shards of its
        own (a worker reads whole shards): a small data set of a few shards then trains as it is. Runs before
        a resumed run restores where each worker's stream stood."""
        rank, world_size = _rank_and_world(self.trainer)
        usable = self.workers_in_use(world_size)
        if usable == self.num_workers:
            return
        if rank == 0:
            log.info("train_shards: %d shard(s) for %d rank(s): loading with %d worker(s) per rank instead "
                     "of num_workers=%d (each worker reads whole shards)", len(self.train_urls), world_size,
                     usable, self.num_workers)
        self.num_workers = usable

    def workers_in_use(self, world_size: int) -> int:
        """The loader workers a rank trains with: `num_workers`, or fewer when the shards are too few to give
        each worker of each rank shards of its own."""
        usable = len(self.train_urls) // world_size
        return usable if not self.resampled and 1 <= usable < self.num_workers else self.num_workers

    def batches_per_rank(self, world_size: int) -> int:
        """Training batches of a rank's epoch before they are shared out among its workers (at least 1)."""
        return max(1, self.epoch_samples // (self.batch_size * world_size))

    def batches_per_worker(self, world_size: int) -> int:
        """Training batches each worker yields per epoch (at least 1)."""
        return math.ceil(self.batches_per_rank(world_size) / max(1, self.num_workers))

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
        """Normalise uint8 images on the device (Lightning calls this after moving the batch), into the
        dtype the trainer's precision gives float inputs (bf16 under `bf16-true`): Lightning converts the
        batch before it moves it, when the images are still uint8."""
        batch = normalize_batch(batch)
        return batch if self.trainer is None else self.trainer.precision_plugin.convert_input(batch)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Note where the batch's stream stands (a host tensor: no device sync) and take the note off; the
        first batch's texts are checked against the vocabulary."""
        if self._vocab is not None and isinstance(batch, dict) and "caption_ids" in batch:
            self._check_coverage(batch)
        read = batch.pop(STREAM_READ_KEY, None) if isinstance(batch, dict) else None
        if read is not None:
            stream, samples = read.tolist()
            if stream < len(self._read):
                self._read[stream] = samples
        return batch

    def _check_coverage(self, batch: dict[str, Any]) -> None:
        """Warn (once, on the first process) when the first batch's captions or tags are mostly [UNK]: a
        vocabulary of another language or model would train on them without a word."""
        vocab, self._vocab = self._vocab, None
        if self.trainer is not None and not self.trainer.is_global_zero:
            return
        for key, what in TEXT_KEYS_CHECKED.items():
            share = unknown_share(batch[key], vocab) if key in batch else None
            if share is not None and share > UNKNOWN_SHARE_WARNING:
                log.warning("data: %.0f%% of the %s word pieces of the first batch are [UNK] under "
                            "data.datamodule.vocab_file=%s: is it the vocabulary of the model and of the "
                            "texts' language?", 100 * share, what, self.vocab_file)

    def _position(self, batches: int) -> tuple[int, int, list[int]] | None:
        """(epoch, batches of it trained, samples each stream had read by then) for the next training pass."""
        where = trainer_position(self.trainer, batches)
        if where is None:
            return None
        epoch, done = where
        streams = max(1, self.num_workers)
        if done == 0 or epoch != self._read_epoch or len(self._read) != streams:
            self._read_epoch, self._read = epoch, [UNKNOWN] * streams
        return epoch, done, list(self._read)

    def state_dict(self) -> dict[str, Any]:
        """Where each training stream of every rank stood after its last trained batch, and how the epoch's
        stream was laid out. Gathered from all ranks: every rank saves a checkpoint together
        (`Trainer.save_checkpoint`)."""
        _, world_size = _rank_and_world(self.trainer)
        read = self._read or [UNKNOWN] * max(1, self.num_workers)
        if world_size > 1:
            device = self.trainer.strategy.root_device
            gathered = self.trainer.strategy.all_gather(torch.tensor(read, device=device))
            reads = gathered.reshape(world_size, -1).tolist()
        else:
            reads = [read]
        return {"epoch": self._read_epoch, "stream_read": reads, "layout": self._layout(world_size),
                "mid_epoch": within_an_epoch(self.trainer),
                DATA_VOCAB_KEY: str(Path(self.vocab_file).resolve())}

    def _layout(self, world_size: int) -> dict[str, Any]:
        """The settings that order an epoch's training batches (the shards by a digest of their list)."""
        shards = hashlib.sha256("\n".join(self.train_urls).encode()).hexdigest()[:16]
        return {"batch_size": self.batch_size, "processes": world_size,
                "num_workers": self.workers_in_use(world_size), "epoch_samples": self.epoch_samples,
                "train_shards": shards, "seed": self.seed,
                "shuffle_buffer": self.shuffle_buffer, "shard_shuffle": self.shard_shuffle,
                "resampled": self.resampled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take this rank's streams from a checkpoint of the same ranks and workers (else: not known). A
        checkpoint saved within an epoch must have laid the epoch out as this run does: the rest of it is read
        from where its streams stood (`ConfigError` naming the first setting that differs)."""
        rank, world_size = _rank_and_world(self.trainer)
        self.check_resumable(state, world_size)
        reads = state.get("stream_read") or []
        streams = max(1, self.num_workers)
        if len(reads) == world_size and len(reads[rank]) == streams:
            self._read_epoch, self._read = int(state["epoch"]), [int(r) for r in reads[rank]]

    def check_resumable(self, state: dict[str, Any], world_size: int) -> None:
        """`ConfigError` when the checkpoint `state` (this datamodule's) was saved before its epoch ended and
        this run, over `world_size` processes, would lay that epoch out otherwise (names the setting)."""
        if state.get("mid_epoch"):
            _check_same_layout(state.get("layout") or {}, self._layout(world_size))

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
        if isinstance(dataset, EpochStream):
            return EpochLoader(dataset, position=self._position, **settings)
        return DataLoader(dataset, **settings)

    def _pipeline(
        self, urls: list[str], counter: SkipCounter, stream: EpochStream | None = None, rank: int = 0,
        world: int = 1,
    ) -> list[Callable]:
        """Shards -> tar members -> samples; `stream` (training) seeds the shard order at each pass and
        splits the shards; without one (validation) they are split by `rank` of `world`, then by worker."""
        if stream and self.resampled:
            draws = functools.partial(resampled_shards, urls, stream.rngs["shards"])
            source = [draws, stream.start, stream.drawn]
        elif stream:
            source = [wds.SimpleShardList(urls), stream.start, stream.split]
            if self.shard_shuffle:
                source.append(wds.shuffle(self.shard_shuffle, self.shard_shuffle, rng=stream.rngs["shards"]))
        else:
            ours = functools.partial(rank_and_worker_shards, rank=rank, world=world)
            source = [wds.SimpleShardList(urls), ours]
        return [
            *source,
            functools.partial(read_shards, counter=counter, expected=self.shard_sizes),
            functools.partial(wds.tariterators.group_by_keys, handler=counter.tar_handler),
        ]

    def _warn_uneven_streams(self, world_size: int, workers: int, quota: int) -> None:
        """Warn when the training streams' shards (each rank's workers read whole shards of their own) hold
        numbers of samples more than `UNEVEN_STREAMS` apart, as the index tells: each stream takes `quota`
        samples an epoch, so the samples of one are trained that much more often than another's."""
        counts = [self.shard_sizes.get(shard_key(url)) for url in self.train_urls]
        if None in counts:
            return
        held = stream_samples(counts, world_size, workers)
        if max(held) <= min(held) * (1 + UNEVEN_STREAMS):
            return
        log.warning("train_shards: the %d loader streams (ranks x workers) read shards holding %d to %d "
                    "samples, and each takes %d an epoch: one with fewer repeats some of its samples within "
                    "the epoch, one with more leaves some out. Shards of equal sizes, or a worker count that "
                    "shares them out evenly, avoid it", len(held), min(held), max(held), quota)

    def train_dataloader(self) -> DataLoader:
        rank, world_size = _rank_and_world(self.trainer)
        if not self.resampled and len(self.train_urls) < world_size * max(1, self.num_workers):
            raise ConfigError(
                f"train_shards: {len(self.train_urls)} shard(s) for {world_size} rank(s) x "
                f"{max(1, self.num_workers)} worker(s); every worker needs a shard (set resampled=true, "
                "write smaller shards or train on fewer devices)"
            )
        counter = SkipCounter()
        per_worker = self.batches_per_worker(world_size)
        workers = max(1, self.num_workers)
        trained = per_worker * workers * self.batch_size * world_size
        if trained != self.epoch_samples and rank == 0:
            log.info("an epoch trains %d samples: epoch_samples=%d rounded to %d batches of %d for each of "
                     "%d loader worker(s) on %d rank(s)", trained, self.epoch_samples, per_worker,
                     self.batch_size, workers, world_size)
        if rank == 0 and not self.resampled:
            self._warn_uneven_streams(world_size, workers, per_worker * self.batch_size)
        stream = EpochStream(self.seed, rank, world_size, self.batch_size, per_worker, workers)
        counter.replaying = stream.replaying  # shard-level skips met again while finding a resumed place
        if self.resampled:
            stream.draw_limit = barren_draw_limit(len(self.train_urls))
        samples = stream.rngs["samples"]
        shuffle = [wds.shuffle(self.shuffle_buffer, rng=samples)] if self.shuffle_buffer > 0 else []
        stream.pipeline = wds.DataPipeline(
            *self._pipeline(self.train_urls, counter, stream),
            *shuffle,
            stream.positions,
            wds.map(Seeded(self._transform(train=True)), handler=counter.sample_handler),
        )
        stream.collate = Collate(counter)
        return self._loader(stream)

    def val_dataloader(self) -> DataLoader | Lockstep | list:
        """One pass over this rank's share of the validation shards (see the module docstring); in step
        with the other ranks' passes when the strategy shards the parameters (`Lockstep`)."""
        if not self.val_urls:
            return []
        rank, world_size = _rank_and_world(self.trainer)
        counter = SkipCounter()
        dataset = wds.DataPipeline(
            *self._pipeline(self.val_urls, counter, rank=rank, world=world_size),
            wds.map(self._transform(train=False), handler=counter.sample_handler),
            wds.batched(self.val_batch_size, collation_fn=Collate(counter), partial=True),
            functools.partial(with_final_skips, counter=counter),
        )
        loader = self._loader(dataset)
        if world_size > 1 and shards_parameters(getattr(self.trainer, "strategy", None)):
            return Lockstep(loader, self.trainer.strategy.root_device)
        return loader
