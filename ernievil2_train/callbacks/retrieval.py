"""Zero-shot retrieval evaluation during training: before the first step and at the end of every training
epoch (after that epoch's validation, if any).

Each rank encodes a strided slice of the eval set with `pl_module.model`; the `ZeroShotRetrieval` metric
gathers the slices and every rank scores the whole set, so the logged values are identical everywhere.
Texts and images are ranked by cosine similarity (L2-normalized embeddings), the similarity the contrastive
losses train and the one `embed` writes for the official evaluation.
Under a strategy that wraps the LightningModule (DDP, FSDP) the encoders are called through the wrapper, as
in a training step (FSDP gathers its sharded parameters there), and every rank makes the same number of
calls: the slices are padded to one length.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import WandbLogger
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from ernievil2_train.config_checks import ConfigError
from ernievil2_train.data.evalset import EvalSet, load_evalset
from ernievil2_train.imaging import to_rgb
from ernievil2_train.metrics.encode import (
    CropBatches,
    drop_images,
    encode_crops,
    encode_texts,
    image_crops,
)
from ernievil2_train.metrics.retrieval import DEFAULT_CHUNK_SIZE
from ernievil2_train.metrics.zeroshot import ZeroShotRetrieval
from ernievil2_train.text import ErnieTokenizer
from ernievil2_train.text.tokenizer import OFFICIAL_MAX_LEN
from ernievil2_train.vision import eval_transform

log = logging.getLogger(__name__)
# the recall lines, for the run's log file: the Hydra config sends this logger to the file only (the console
# gets the plain line above the progress bar)
report_log = logging.getLogger("ernievil2_train.retrieval_report")
PREFIX = "retrieval/"  # of every metric the callback logs
LOGGED = ("t2i/r@1", "t2i/r@5", "t2i/r@10", "i2t/r@1", "i2t/r@5", "i2t/r@10", "mean_recall")
PROTOCOLS = ("any_positive", "ernie")
AUTOCAST = {
    "bf16-mixed": torch.bfloat16,
    "16-mixed": torch.float16,
    "bf16-true": torch.bfloat16,
    "16-true": torch.float16,
}


class TrainingDiverged(RuntimeError):
    """The model's weights went NaN or infinite during training (the message is one line)."""


def eval_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the eval encoding: the training precision's on CUDA; elsewhere only for the
    "-true" precisions (their weights are half precision, float32 inputs would not run), else float32."""
    dtype = AUTOCAST.get(precision)
    if device.type == "cuda" or precision.endswith("-true"):
        return dtype
    return None


def cap_evalset(evalset: EvalSet, max_items: int | None) -> EvalSet:
    """The first `max_items` images and the first `max_items` texts that keep a positive among them."""
    if max_items is None or (len(evalset.images) <= max_items and len(evalset.texts) <= max_items):
        return evalset
    capped = keep_images(evalset, [i < max_items for i in range(len(evalset.images))])
    return EvalSet(capped.image_ids, capped.images, capped.text_ids[:max_items], capped.texts[:max_items],
                   capped.text_to_images[:max_items])


def keep_images(evalset: EvalSet, keep: list[bool]) -> EvalSet:
    """The eval set with the images `keep` marks, and the texts that keep a positive among them."""
    kept, positives = drop_images(evalset.text_to_images, keep)
    images = [i for i, ok in enumerate(keep) if ok]
    return EvalSet(
        [evalset.image_ids[i] for i in images],
        [evalset.images[i] for i in images],
        [evalset.text_ids[t] for t in kept],
        [evalset.texts[t] for t in kept],
        positives,
    )


def rank_slice(n: int, rank: int, world: int) -> tuple[list[int], int]:
    """Indices `rank, rank + world, ...` below `n`, padded by repeating one of them to `ceil(n / world)`
    (the same length on every rank), and how many are real."""
    real = list(range(rank, n, world))
    length = -(-n // world)
    return real + (real[-1:] or [0]) * (length - len(real)), len(real)


class StrategyEncoder:
    """`encode_image` / `encode_text` of `pl_module.model`, run through the strategy's wrapper of the
    LightningModule when there is one. Every rank must make the same calls (the wrapper may communicate).
    Each call advances `bar` by its batch size."""

    def __init__(self, trainer: pl.Trainer, pl_module: pl.LightningModule, bar: tqdm) -> None:
        self.wrapper, self.pl_module, self.bar = trainer.strategy.model, pl_module, bar
        self.config, self.embed_dim = pl_module.model.config, pl_module.model.embed_dim

    def encode_image(self, pixels: Tensor) -> Tensor:
        return self._call(self.pl_module.model.encode_image, pixels)

    def encode_text(self, input_ids: Tensor) -> Tensor:
        return self._call(self.pl_module.model.encode_text, input_ids)

    def _call(self, encode: Any, inputs: Tensor) -> Tensor:
        output = self._forward(encode, inputs)
        self.bar.update(len(inputs))
        return output

    def _forward(self, encode: Any, inputs: Tensor) -> Tensor:
        if self.wrapper is None or self.wrapper is self.pl_module:
            return encode(inputs)
        module, forward = self.pl_module, self.pl_module.forward

        def redirected(*args: Any) -> Tensor:  # the wrapper's forward lands here, with its set-up done
            module.forward = forward
            return encode(*args)

        module.forward = redirected
        try:
            return self.wrapper(inputs)
        finally:
            module.forward = forward


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode for every submodule, restoring each one's own previous mode (frozen towers stay eval)."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


class RetrievalCallback(pl.Callback):
    """Log `retrieval/{t2i,i2t}/r@{1,5,10}` and `retrieval/mean_recall` for an eval set.

    eval_set / split: see `load_evalset` (None disables the callback). vocab_file: tokenizer vocab.
    image_size: eval transform size (default: the model's). protocol: `any_positive` (unique images and
    texts) or `ernie` (one row per text, paired with its first image). max_items caps images and texts.
    log_examples: with a W&B logger, log a table of a few text queries and their top-5 images.
    image_cache_mb: each rank keeps its eval images decoded and cropped (uint8, 3 * S * S bytes an image)
    after the first evaluation when they fit in this many MiB, so later epochs do not decode them again
    (0: decode every time).
    progress: a bar while encoding, under the trainer's TQDM bars (none when the trainer shows none).
    Runs before training (zero-shot baseline, sent straight to the loggers) and at the end of every training
    epoch, after that epoch's validation if there is one (via `pl_module.log`, so a ModelCheckpoint saving at
    train epoch end can monitor `retrieval/mean_recall`; runs without a validation set are covered too).
    """

    def __init__(
        self,
        eval_set: str | Path | None,
        split: str = "valid",
        vocab_file: str | Path | None = None,
        image_size: int | None = None,
        batch_size: int = 64,
        protocol: str = "any_positive",
        max_items: int | None = None,
        log_examples: bool = True,
        num_examples: int = 4,
        max_len: int = OFFICIAL_MAX_LEN,
        num_workers: int = 0,
        progress: bool = True,
        at_start: bool = True,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        image_cache_mb: int = 4096,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"RetrievalCallback.protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if eval_set is not None and vocab_file is None:
            raise ValueError("RetrievalCallback needs vocab_file to tokenize the eval texts")
        for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if max_len < 2:
            raise ValueError(f"max_len must be at least 2 ([CLS] and [SEP]), got {max_len}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be 0 or more, got {num_workers}")
        if max_items is not None and max_items < 1:
            raise ValueError(f"max_items must be positive (null: all), got {max_items}")
        if image_cache_mb < 0:
            raise ValueError(f"image_cache_mb must be 0 (no cache) or more, got {image_cache_mb}")
        self.eval_set, self.split, self.vocab_file = eval_set, split, vocab_file
        self.image_size, self.batch_size, self.protocol = image_size, batch_size, protocol
        self.max_items, self.log_examples, self.num_examples = max_items, log_examples, num_examples
        self.max_len, self.num_workers, self.progress = max_len, num_workers, progress
        self.at_start, self.chunk_size, self.image_cache_mb = at_start, chunk_size, image_cache_mb
        self.evalset: EvalSet | None = None
        self._crops: tuple[tuple[int, ...], list[tuple[Tensor, Tensor]]] | None = None  # (for which, batches)
        self._said_uncached = False
        self.last: dict[str, float] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.eval_set is None or self.evalset is not None:
            return
        try:
            self.evalset = cap_evalset(load_evalset(self.eval_set, split=self.split), self.max_items)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"callbacks.retrieval.eval_set: {err}") from None
        positions = pl_module.model.config.text.max_position_embeddings  # texts longer than that cannot fit
        self.tokenizer = ErnieTokenizer(self.vocab_file, max_len=min(self.max_len, positions))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.evalset is None or not self.at_start or trainer.global_step > 0:
            return
        metrics = self.evaluate(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_metrics({f"{PREFIX}{k}": metrics[k] for k in LOGGED}, step=trainer.global_step)
        self._report(trainer, pl_module, "zero-shot baseline")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.evalset is None:
            return
        metrics = self.evaluate(trainer, pl_module)
        for key in LOGGED:
            # identical on every rank: the sync only keeps Lightning from warning about epoch-level values
            pl_module.log(f"{PREFIX}{key}", metrics[key], sync_dist=True)
        self._report(trainer, pl_module, f"epoch {trainer.current_epoch}")

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        m = self.last
        line = (
            f"retrieval ({when}): T2I R@1/5/10 {m['t2i/r@1']:.2%} {m['t2i/r@5']:.2%} {m['t2i/r@10']:.2%} | "
            f"I2T R@1/5/10 {m['i2t/r@1']:.2%} {m['i2t/r@5']:.2%} {m['i2t/r@10']:.2%} | "
            f"mean recall {m['mean_recall']:.2%}"
        )
        if trainer.is_global_zero:  # not `pl_module.print`: before the first bar is drawn, the bar drops it
            tqdm.write(line, file=sys.stdout)
            report_log.info(line)
        if self.log_examples and trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_metrics(
                        {"retrieval/examples": self._examples_table(when)}, step=trainer.global_step
                    )

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Encode this rank's slice, gather, score; returns the metrics (identical on every rank)."""
        evalset, model, device = self.evalset, pl_module.model, pl_module.device
        rank, world = trainer.global_rank, trainer.world_size
        amp = eval_autocast(str(trainer.precision), device)
        size = self.image_size or model.config.vision.image_size
        text_idx, n_text = rank_slice(len(evalset.texts), rank, world)
        image_idx, n_image = rank_slice(len(evalset.images), rank, world)
        with eval_mode(model), self._progress_bar(trainer, len(text_idx) + len(image_idx)) as bar:
            encoder = StrategyEncoder(trainer, pl_module, bar)
            text = encode_texts(
                encoder,
                [evalset.texts[i] for i in text_idx],
                self.tokenizer,
                self.batch_size,
                device,
                autocast_dtype=amp,
            )
            batches = self._image_batches(trainer, image_idx, size)
            image, valid = encode_crops(encoder, batches, device, autocast_dtype=amp)
        text, image, valid = text[:n_text], image[:n_image], valid[:n_image]
        self._check_finite(trainer, text, image, device)
        text, image = F.normalize(text, dim=-1), F.normalize(image, dim=-1)
        text_idx, image_idx = text_idx[:n_text], image_idx[:n_image]
        # which images every rank could decode (each marks its slice); all ranks agree on what to leave out
        decoded = torch.ones(len(evalset.images), dtype=torch.long, device=device)
        decoded[torch.tensor(image_idx, dtype=torch.long, device=device)] = valid.to(device).long()
        decoded = trainer.strategy.reduce(decoded, reduce_op="min").bool().tolist()
        if not all(decoded):
            return self._without_undecodable(trainer, pl_module, decoded)
        metric = ZeroShotRetrieval(
            evalset.text_to_images,
            num_images=len(evalset.images),
            protocol=self.protocol,
            chunk_size=self.chunk_size,
        ).to(device)
        metric.update(
            text, torch.tensor(text_idx, device=device), image, torch.tensor(image_idx, device=device)
        )
        with metric.sync_context():
            text_all, image_all = metric.embeddings()
            self.last = metric.score(text_all, image_all)
            if self.log_examples and trainer.is_global_zero:
                self._top = self._top_images(text_all, image_all)
        return self.last

    def _image_batches(self, trainer: pl.Trainer, image_idx: list[int], size: int) -> CropBatches:
        """This rank's eval images as uint8 crop batches: from the cache when it holds them, else decoded
        (and kept when they fit `image_cache_mb`)."""
        key = (len(self.evalset.images), trainer.global_rank, trainer.world_size, size)
        if self._crops is not None and self._crops[0] == key:
            return self._crops[1]
        self._crops = None
        images = [self.evalset.images[i] for i in image_idx]
        batches = image_crops(images, eval_transform(size), self.batch_size, self.num_workers)
        cache_bytes = len(images) * 3 * size * size
        if cache_bytes <= self.image_cache_mb * 2**20:
            return self._keeping(key, batches)
        if self.image_cache_mb and trainer.is_global_zero and not self._said_uncached:
            self._said_uncached = True
            log.info("retrieval: the eval images take %.1f MiB a rank decoded, over "
                     "callbacks.retrieval.image_cache_mb=%d; they are decoded at every evaluation",
                     cache_bytes / 2**20, self.image_cache_mb)
        return batches

    def _keeping(self, key: tuple[int, ...], batches: CropBatches) -> Iterator[tuple[Tensor, Tensor]]:
        """`batches`, kept as copies in this process's memory: a loader worker's batch lives in shared
        memory with a file descriptor open, and thousands of them would run out of both."""
        kept = []
        for crops, ok in batches:
            kept.append((crops.clone(), ok.clone()))
            yield crops, ok
        self._crops = key, kept

    @staticmethod
    def _check_finite(trainer: pl.Trainer, text: Tensor, image: Tensor, device: torch.device) -> None:
        """Stop with `TrainingDiverged` on every rank when any rank's embeddings are NaN or infinite."""
        finite = torch.tensor(int(bool(text.isfinite().all() and image.isfinite().all())), device=device)
        if not bool(trainer.strategy.reduce(finite, reduce_op="min")):
            raise TrainingDiverged(
                f"the model gives NaN or infinite embeddings after {trainer.global_step} steps: the training "
                "diverged (lower module.optimizer.lr, or clip with trainer.gradient_clip_val); its "
                "checkpoints hold those weights, so start a new run rather than resume this one"
            )

    def _without_undecodable(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             decoded: list[bool]) -> dict[str, float]:
        """Leave the images no rank could decode out of the eval set for good (with the texts left without a
        positive), say so once, and evaluate again; as `python -m ernievil2_train.evaluate` skips them."""
        evalset = self.evalset
        self.evalset = keep_images(evalset, decoded)
        bad = [image_id for image_id, ok in zip(evalset.image_ids, decoded, strict=True) if not ok]
        if not self.evalset.images or not self.evalset.texts:
            raise ConfigError(f"callbacks.retrieval.eval_set: {self.eval_set}: no eval image could be "
                              f"decoded (first: {bad[0]!r})")
        if trainer.is_global_zero:
            log.warning("retrieval: skipped %d undecodable eval image(s) of %s (first: %r) and %d text(s) "
                        "left without an image", len(bad), self.eval_set, bad[0],
                        len(evalset.texts) - len(self.evalset.texts))
        return self.evaluate(trainer, pl_module)

    def _progress_bar(self, trainer: pl.Trainer, total: int) -> tqdm:
        """A bar on the first free line under the trainer's TQDM bars, erased when done, when `progress` is on
        and the trainer shows such bars on this rank; else a bar that draws nothing."""
        progress_bar = trainer.progress_bar_callback
        shown = self.progress and isinstance(progress_bar, TQDMProgressBar) and progress_bar.is_enabled
        return tqdm(total=total, desc="Retrieval", leave=False, dynamic_ncols=True, file=sys.stdout,
                    disable=not shown)

    def _top_images(self, text: Tensor, image: Tensor, k: int = 5) -> list[list[int]]:
        queries = text[: self.num_examples]
        return (queries @ image.T).topk(min(k, image.shape[0]), dim=1).indices.tolist()

    def _examples_table(self, when: str) -> Any:
        import wandb

        evalset = self.evalset
        table = wandb.Table(columns=["when", "text", "hit@5", *[f"top{i + 1}" for i in range(5)]])
        for t, top in enumerate(self._top):
            positives = set(evalset.text_to_images[t])
            images = [
                wandb.Image(
                    _thumbnail(evalset.images[i]),
                    caption=("✓ " if i in positives else "") + evalset.image_ids[i],
                )
                for i in top
            ]
            table.add_data(
                when, evalset.texts[t], bool(positives & set(top)), *images, *[None] * (5 - len(images))
            )
        return table


def _thumbnail(data: bytes, size: int = 96) -> Image.Image:
    image = to_rgb(Image.open(io.BytesIO(data)))
    image.thumbnail((size, size))
    return image
