"""The LightningModule: multi-view contrastive training of a `DualEncoder`."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from ernievil2_train.accumulation import feature_cache_step, split_batch
from ernievil2_train.checkpoints.io import MODEL_CONFIG_KEY
from ernievil2_train.config_checks import ConfigError
from ernievil2_train.data.decode import SKIP_REASONS
from ernievil2_train.data.fit import check_data_fits_model
from ernievil2_train.data.lockstep import shards_parameters
from ernievil2_train.distributed import LocalBatchSize, world
from ernievil2_train.losses.infonce import MAX_LOG_SCALE, LossConfig, MultiViewInfoNCE, symmetric_infonce
from ernievil2_train.losses.multiview import (
    BATCH_KEYS,
    IMAGE_FEATURES,
    TEXT_FEATURES,
    Batch,
    batch_metadata,
    encode_views,
    gathered_losses,
    required_batch_keys,
)
from ernievil2_train.optim import (
    OPTIMIZER_REFUSALS,
    ScheduleConfig,
    clip_grad_norm,
    tower_param_groups,
    warmup_cosine,
)
from ernievil2_train.rng import (
    GeneratorStates,
    own_rng_state,
    part_ranks,
    rng_states_of_ranks,
    set_rng_state,
)

log = logging.getLogger(__name__)

EPOCH_SKIPS_KEY = "epoch_skipped"  # checkpoint entry: {"epoch", "counts"} of training skips so far
RNG_KEY = "rng_state"  # checkpoint entry: the random generators' states (dropout masks go on as they would)
SCHEDULE_KEY = "lr_schedule_steps"  # checkpoint entry: the optimizer steps the lr schedule was laid out for
PER_SAMPLE_KEYS = {*BATCH_KEYS.values(), "image_key", "caption_key", "has_tags", "tags_key", "text_view_key"}
TOWER_FEATURES = {"vision": tuple(IMAGE_FEATURES), "text": tuple(TEXT_FEATURES)}
BATCH_KEY_HELP = {
    "image_view2": "the second augmented image view",
    "text_view_ids": "the text-text view",
    "tag_ids": "the tag view",
    "has_tags": "the tag view",
    "image_key": "image keys (needed by loss.multi_positive)",
    "caption_key": "caption keys (needed by loss.multi_positive)",
    "tags_key": "tag keys (needed by loss.multi_positive)",
}
VIEW_SETTINGS = {"image_caption": "caption_image_view", "image_tags": "tags_image_view"}  # which image view
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
IMAGE_PAIRS = ("image_caption", "image_tags", "image_image")
TEXT_PAIRS = ("image_caption", "image_tags", "text_text")


class TrainingConfigError(ConfigError):
    """A combination of settings that cannot train correctly; the message names the settings."""


def _batch_size(batch: dict[str, torch.Tensor]) -> int:
    return next(batch[k].shape[0] for k in sorted(PER_SAMPLE_KEYS) if k in batch)


def optimizer_defaults(factory: Callable[..., Any], device: torch.device) -> tuple[float, float]:
    """The `lr` and `weight_decay` an optimizer `factory` (a partial, a class, any callable) gives a group
    that sets neither: read from an optimizer it builds for one placeholder parameter on `device`."""
    probe = factory([torch.zeros(1, device=device, requires_grad=True)])
    if not isinstance(probe, torch.optim.Optimizer):
        raise TypeError(f"the factory made a {type(probe).__name__}, not a torch.optim.Optimizer")
    return float(probe.defaults.get("lr", 1e-3)), float(probe.defaults.get("weight_decay", 0.0))


class ErnieVil2Module(pl.LightningModule):
    """Dual-encoder training with the multi-view InfoNCE losses.

    model: a `DualEncoder` (available as `self.model`). loss: `LossConfig` fields. optimizer: a factory taking
    param groups (Hydra `_partial_: true`); the `lr` and `weight_decay` it sets are every group's defaults.
    scheduler: `ScheduleConfig` fields (per-step warmup + cosine). vision_lr / text_lr / temperature_lr
    override the lr per group; layer_decay < 1 scales block i's lr by layer_decay ** (depth - i).
    compile: `torch.compile` both towers (true, or a mode such as "max-autotune").
    freeze_vision / freeze_text: LiT-style (tower in eval mode, no grads, not optimized); a tower no active
    loss uses is frozen the same way. accumulate_microbatches = k > 1: feature-cache accumulation over k
    chunks of each batch (manual optimization). gradient_clip_val: the global gradient norm to clip at, here
    rather than by the Trainer (a run moves `trainer.gradient_clip_val` here).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossConfig | dict[str, Any] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: ScheduleConfig | dict[str, Any] | None = None,
        vision_lr: float | None = None,
        text_lr: float | None = None,
        temperature_lr: float | None = None,
        layer_decay: float = 1.0,
        freeze_vision: bool = False,
        freeze_text: bool = False,
        grad_checkpointing: bool = False,
        compile: bool | str = False,
        accumulate_microbatches: int = 1,
        gradient_clip_val: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "optimizer"])
        self.model = model
        self.loss_fn = MultiViewInfoNCE(loss)
        self.optimizer_factory = optimizer or functools.partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.05)
        self.schedule = ScheduleConfig.from_any(scheduler)
        self.lrs = {"vision": vision_lr, "text": text_lr, "temperature": temperature_lr}
        self.layer_decay = float(layer_decay)
        self.accumulate_microbatches = int(accumulate_microbatches)
        self.gradient_clip_val = gradient_clip_val
        self._check_numbers()
        self._check_optimizer()
        self.frozen = self._frozen_towers(freeze_vision, freeze_text)
        for tower in self.frozen:
            getattr(self.model, tower).requires_grad_(False).eval()
        mode, active = self.loss_fn.config.temperature, self.loss_fn.config.active_pairs()
        if mode == "fixed" or (mode == "per_pair" and "image_caption" not in active):
            self.model.logit_scale.requires_grad_(False)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        mode = self._compile_mode(compile)
        if mode is not None:
            self.model.vision.compile(mode=mode)
            self.model.text.compile(mode=mode)
        self.automatic_optimization = self.accumulate_microbatches == 1
        self._batch_checked = False
        self._local_size = LocalBatchSize()
        self._window_start: float | None = None
        self._window_samples = 0
        self._skipped: torch.Tensor | None = None
        self._restored_skips: dict[str, Any] | None = None
        self._restored_rng: list[GeneratorStates] | GeneratorStates | None = None
        self._schedule_steps: int | None = None  # this run's, once the optimizers are configured
        self._restored_schedule_steps: int | None = None
        self._val_sums: torch.Tensor | None = None  # the validation epoch's sums, set at its start

    def _check_numbers(self) -> None:
        """Refuse micro-batch counts, clipping norms and layer decays that would give wrong gradients."""
        k = self.accumulate_microbatches
        if k < 1:
            raise TrainingConfigError(f"module.accumulate_microbatches must be >= 1, got {k}")
        clip = self.gradient_clip_val
        if clip is not None and (
            isinstance(clip, bool) or not isinstance(clip, int | float) or not 0 < clip < math.inf
        ):
            raise TrainingConfigError(
                f"module.gradient_clip_val must be positive and finite (null: no clipping), got {clip!r}"
            )
        for tower, lr in self.lrs.items():
            if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float)
                                   or not 0 <= lr < math.inf):
                raise TrainingConfigError(f"module.{tower}_lr must be 0 or more and finite (null: "
                                          f"module.optimizer.lr), got {lr!r}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise TrainingConfigError(f"module.layer_decay must be in (0, 1], got {self.layer_decay}")

    def _check_optimizer(self) -> None:
        """Refuse the settings a torch optimizer refuses (a negative lr, one beta) now, before the run starts
        its loggers and the zero-shot baseline: built once on a one-number parameter. Other optimizers may
        need their parameters on a device: they are built only when training starts. An lr of 0 for every
        part is refused too: the run would train nothing."""
        factory = self.optimizer_factory
        if not getattr(getattr(factory, "func", factory), "__module__", "").startswith("torch.optim"):
            return
        try:
            base, _ = optimizer_defaults(factory, torch.device("cpu"))
        except OPTIMIZER_REFUSALS as error:
            raise TrainingConfigError(f"module.optimizer: {error}") from None
        if all((base if lr is None else lr) == 0 for lr in self.lrs.values()):
            raise TrainingConfigError("module.optimizer.lr is 0 and no vision_lr, text_lr or temperature_lr "
                                      "is above it: nothing would train")

    def _frozen_towers(self, freeze_vision: bool, freeze_text: bool) -> list[str]:
        """The towers that do not train: the frozen ones, and any that no active loss reaches. Refuses
        freezing both, and freezing the only tower a single-tower loss (image↔image, text↔text) trains."""
        if freeze_vision and freeze_text:
            raise TrainingConfigError(
                "module.freeze_vision and module.freeze_text are both set: nothing would train"
            )
        active = self.loss_fn.config.active_pairs()
        checks = ((freeze_vision, "vision", "image_image"), (freeze_text, "text", "text_text"))
        for frozen, tower, pair in checks:
            if frozen and pair in active:
                raise TrainingConfigError(
                    f"module.freeze_{tower} with module.loss.weights.{pair} > 0: "
                    "that loss reaches only the frozen tower"
                )
        frozen_towers = [t for t, f in (("vision", freeze_vision), ("text", freeze_text)) if f]
        if not any(p in active for p in IMAGE_PAIRS) and "vision" not in frozen_towers:
            frozen_towers.append("vision")
        if not any(p in active for p in TEXT_PAIRS) and "text" not in frozen_towers:
            frozen_towers.append("text")
        return frozen_towers

    @staticmethod
    def _compile_mode(compile: bool | str) -> str | None:
        """`torch.compile` mode for the towers, None for eager; `true` is the "default" mode."""
        if compile is True:
            return "default"
        if compile is False or compile is None:
            return None
        if compile not in COMPILE_MODES:
            raise TrainingConfigError(
                f"module.compile must be true, false or one of {', '.join(COMPILE_MODES)}; got {compile!r}"
            )
        return str(compile)

    # ---- set-up checks -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Refuse a data module whose images, texts or vocabulary the model cannot take (the training command
        checks this before it starts; a trainer set up in Python gets the same check here)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            check_data_fits_model(datamodule, self.model)

    def on_fit_start(self) -> None:
        if self.automatic_optimization and self.trainer.accumulate_grad_batches > 1:
            raise TrainingConfigError(
                f"trainer.accumulate_grad_batches={self.trainer.accumulate_grad_batches} does not give the "
                "gradient of a bigger contrastive batch (negatives never meet across accumulated batches); "
                "set it to 1 and use module.accumulate_microbatches (feature-cache accumulation) instead"
            )

    def _check_batch(self, batch: dict[str, torch.Tensor]) -> None:
        self.check_batch_keys(set(batch))
        self._batch_checked = True

    def check_batch_keys(self, keys: set[str]) -> None:
        """`TrainingConfigError` naming the first loss pair whose view is not among a batch's `keys`."""
        missing = {key: pair for key, pair in required_batch_keys(self.loss_fn).items() if key not in keys}
        if missing:
            key, pair = next(iter(missing.items()))
            what = BATCH_KEY_HELP.get(key, key)
            fixes = f"turn on that view in the data config or set module.loss.weights.{pair}=0"
            view_setting = VIEW_SETTINGS.get(pair)
            if key == "image_view2" and view_setting:  # the pair was pointed at the second view
                fixes += f", or module.loss.{view_setting}=1"
            raise TrainingConfigError(
                f"module.loss.weights.{pair} > 0 needs batch key {key!r} ({what}), which the data pipeline "
                f"does not produce: {fixes}"
            )

    def train(self, mode: bool = True) -> ErnieVil2Module:
        super().train(mode)
        for tower in self.frozen:
            getattr(self.model, tower).eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the model's architecture beside its weights (`python -m ernievil2_train.export` reads it),
        and the epoch's training skip counts so far, so a run resumed mid-epoch logs the whole epoch's."""
        checkpoint[MODEL_CONFIG_KEY] = self.model.config.to_dict()
        checkpoint[EPOCH_SKIPS_KEY] = {"epoch": self.current_epoch, "counts": self._epoch_skips_so_far()}
        checkpoint[RNG_KEY] = rng_states_of_ranks(self.device)
        checkpoint[SCHEDULE_KEY] = self._schedule_steps

    def _epoch_skips_so_far(self) -> list[int]:
        """This epoch's training skip counts, summed over ranks (every rank saves a checkpoint together)."""
        counts = torch.zeros(len(SKIP_REASONS), dtype=torch.long, device=self.device)
        if self._skipped is not None:
            counts += self._skipped
        if world()[1] > 1:
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
        return counts.tolist()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._restored_skips = checkpoint.get(EPOCH_SKIPS_KEY)
        self._restored_rng = checkpoint.get(RNG_KEY)
        self._restored_schedule_steps = checkpoint.get(SCHEDULE_KEY)

    # ---- training --------------------------------------------------------------------------------------
    def _encode(self, batch: Batch, names: list[str] | None = None) -> Batch:
        """Raw features of the views the active losses need (or of `names`)."""
        names = self.loss_fn.config.required_features() if names is None else names
        return encode_views(self.model, batch, names)

    def _losses(self, features: Batch, batch: Batch) -> Batch:
        size = next(iter(features.values())).shape[0]
        metadata = batch_metadata(batch, size, self.device)
        return gathered_losses(self.loss_fn, features, metadata, self.model.logit_scale, self._local_size)

    def forward(self, batch: Batch) -> Batch:
        """Encode the needed views, gather once; this rank's {"loss", "loss_<pair>", "acc_<pair>"}."""
        return self._losses(self._encode(batch), batch)

    def feature_cache_losses(
        self, batch: Batch, backward: Callable[[torch.Tensor], None], no_sync: Callable[[], Any]
    ) -> Batch:
        """Feature-cache accumulation over `accumulate_microbatches` chunks of `batch`: gradients land in
        `.grad` (via `backward`, all but the last under `no_sync`); returns the detached loss dict."""
        return feature_cache_step(
            split_batch(batch, self.accumulate_microbatches, PER_SAMPLE_KEYS),
            self._encode,
            lambda features: self._losses(features, batch),
            [self.model.logit_scale, *self.loss_fn.log_scales.values()],
            backward,
            no_sync,
            self.device,
            frozenset(name for tower in self.frozen for name in TOWER_FEATURES[tower]),
        )

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        if not self._batch_checked:
            self._check_batch(batch)
        if self.automatic_optimization:
            out = self(batch)
            self._log_train(out, batch)
            return out["loss"]
        optimizer = self.optimizers()
        optimizer.zero_grad()
        # DDP's no_sync (ParallelStrategy.block_backward_sync); nothing to block on a single device
        no_sync = getattr(self.trainer.strategy, "block_backward_sync", contextlib.nullcontext)
        out = self.feature_cache_losses(batch, self.manual_backward, no_sync)
        self._log_train(out, batch)  # before the step, as Lightning's own step comes after it: same scales
        optimizer.step()  # clips in `on_before_optimizer_step`
        self.lr_schedulers().step()
        return None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the gradients' global norm at `gradient_clip_val`. Lightning calls this hook after the
        mixed-precision grad scaler has unscaled the gradients, so the norm is that of the true gradient."""
        if self.gradient_clip_val is not None:
            clip_grad_norm(self.trainer.strategy.model, self.gradient_clip_val)

    def global_metrics(self, out: Batch, batch: Batch) -> Batch:
        """The global batch's loss, loss terms and top-1 accuracies from this rank's `out` (detached).

        Each rank's loss terms are shares whose mean over ranks is the global loss; each accuracy is over the
        rows of this rank that take part (for image↔tags, the tagged ones; a rank may have none), so the
        global accuracy weights them by those counts. One all-reduce; none on a single process.
        """
        pairs = self.loss_fn.config.active_pairs()
        names = ["loss", *(f"loss_{pair}" for pair in pairs)]
        _, world_size = world()
        if world_size == 1:
            return {name: out[name].detach() for name in names + [f"acc_{pair}" for pair in pairs]}
        loss = out["loss"].detach()
        everyone = torch.full((), float(_batch_size(batch)), dtype=loss.dtype, device=loss.device)
        tag_masked = [self.loss_fn.config.spec(pair).tag_masked for pair in pairs]
        rows = [batch["has_tags"].sum().to(loss) if masked else everyone for masked in tag_masked]
        # accuracy = hits of both directions / (2 * max(rows, 1)): accuracy * rows = hits / 2 (0 if no rows)
        hits = [out[f"acc_{pair}"].detach().to(loss) * r for pair, r in zip(pairs, rows, strict=True)]
        stats = torch.stack([*(out[name].detach() for name in names), *hits, *rows])
        torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.SUM)
        losses, hits_sum, rows_sum = stats.split([len(names), len(pairs), len(pairs)])
        metrics = {name: value / world_size for name, value in zip(names, losses, strict=True)}
        for pair, hit, row in zip(pairs, hits_sum, rows_sum, strict=True):
            metrics[f"acc_{pair}"] = hit / row.clamp(min=1)
        return metrics

    def _log_train(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        size = _batch_size(batch)
        metrics = self.global_metrics(out, batch)
        self.log("train/loss", metrics["loss"], batch_size=size)  # shown by LossProgressBar
        for pair in self.loss_fn.config.active_pairs():
            self.log(f"train/loss_{pair}", metrics[f"loss_{pair}"], batch_size=size)
            self.log(f"train/acc_{pair}", metrics[f"acc_{pair}"], batch_size=size)
            scale = self.loss_fn.log_scale(pair, self.model.logit_scale).detach().exp()
            self.log(f"train/scale_{pair}", scale, batch_size=size)
        skipped = batch.get("skipped")
        if skipped is not None:
            skipped = skipped.detach().reshape(-1).long()
            self._skipped = skipped if self._skipped is None else self._skipped + skipped

    @torch.no_grad()
    def clamp_temperatures(self) -> None:
        """Keep every learnable log-scale in [0, ln 100] (the official code's clip is a no-op)."""
        if self.model.logit_scale.requires_grad:
            self.model.logit_scale.clamp_(0.0, MAX_LOG_SCALE)
        self.loss_fn.clamp_()

    def on_train_start(self) -> None:
        """Clamp once before the first step too: a loaded checkpoint may hold a log-scale beyond ln 100.
        Resumed mid-epoch (Lightning then skips `on_train_epoch_start`), rank 0 starts the epoch's skip counts
        from the checkpoint's totals over ranks, so the epoch-end sum over ranks counts them once. The random
        generators of each rank get that rank's states from the checkpoint last thing before training, so the
        resumed steps draw the dropout masks the uninterrupted run drew; starting afresh, each rank's own."""
        self.clamp_temperatures()
        restored_rng, self._restored_rng = self._restored_rng, None
        own = own_rng_state(restored_rng, *world()) if restored_rng else None
        if own is not None:
            set_rng_state(own, self.device)
        else:
            part_ranks(self.global_rank)
        restored, self._restored_skips = self._restored_skips, None
        if restored and restored["epoch"] == self.current_epoch and self.global_rank == 0:
            self._skipped = torch.tensor(restored["counts"], dtype=torch.long, device=self.device)

    def on_train_batch_end(self, outputs: Any, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.clamp_temperatures()
        self._log_throughput(_batch_size(batch))

    def _log_throughput(self, batch_size: int) -> None:
        """samples/s since the previous report, straight to the loggers on logging steps. Host numbers do not
        go through `self.log`, which would copy them to the device (a host sync) in every step."""
        now = time.perf_counter()
        if self._window_start is None:  # the first batch (start-up, compilation) is not timed
            self._window_start, self._window_samples = now, 0
            return
        self._window_samples += batch_size
        step, every = self.trainer.global_step, self.trainer.log_every_n_steps
        if not every or step % every or not self.loggers:  # 0: Lightning logs no step either
            return
        per_device = self._window_samples / max(now - self._window_start, 1e-9)
        total = per_device * world()[1]
        metrics = {"train/samples_per_s_per_device": per_device, "train/samples_per_s": total}
        for logger in self.loggers:  # at the step Lightning logs this batch's values at (the one before it)
            logger.log_metrics(metrics, step=step - 1)
        self._window_start, self._window_samples = now, 0

    def on_train_epoch_start(self) -> None:
        self._window_start = None
        self._skipped = None

    def logged_metrics(self, validates: bool) -> set[str]:
        """The names this module logs through `self.log` (what a callback can monitor); the `val/` ones only
        when the run `validates`. A subclass that logs more names adds them here."""
        names = {"train/loss", *(f"data/skipped_{reason}" for reason in SKIP_REASONS)}
        for pair in self.loss_fn.config.active_pairs():
            names.update(f"train/{what}_{pair}" for what in ("loss", "acc", "scale"))
        if validates:
            names.update({"val/loss_image_caption", "val/acc_image_caption"})
            names.update(f"val/skipped_{reason}" for reason in SKIP_REASONS)
        return names

    def on_train_epoch_end(self) -> None:
        """The epoch's training skip counts, summed over ranks. Every rank logs them, zeros when it saw none
        (a run resumed at an epoch's end has no batch left, and only rank 0 holds the restored counts): the
        sum is a collective that every rank must join."""
        skipped = self._skipped
        if skipped is None:
            skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long, device=self.device)
        for reason, count in zip(SKIP_REASONS, skipped, strict=True):
            self.log(f"data/skipped_{reason}", count.float(), reduce_fx="sum", sync_dist=True)

    # ---- validation ------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        # loss * n, accuracy * n, n, batches carrying skip counts, then the skip counts per reason
        self._val_sums = torch.zeros(4 + len(SKIP_REASONS), device=self.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Image↔caption loss and top-1 within the local validation batch; with `loss.multi_positive`, the
        captions of the same image, and alike captions of other images, are positives, as in training.
        Summed here, logged at epoch end. A batch of only `skipped` (a loader worker's last skip counts) adds
        those."""
        sums = self._val_sums
        skipped = batch.get("skipped")
        if skipped is not None:
            sums[3] += 1
            sums[4:] += skipped.reshape(-1).to(sums)
        if "image" not in batch:
            if self._in_lockstep():
                self._throwaway_forward()
            return
        feats = encode_views(self.model, batch, ["image", "caption"])
        img, txt = (nn.functional.normalize(feats[k].float(), dim=-1) for k in ("image", "caption"))
        keys = [batch["image_key"], batch["caption_key"]] if self.loss_fn.config.multi_positive else None
        loss, acc = symmetric_infonce(img, txt, txt, img, self.model.logit_scale.exp(), 0, keys=keys)
        size = batch["image"].shape[0]
        sums[0] += loss.float() * size
        sums[1] += acc.float() * size
        sums[2] += size

    def _in_lockstep(self) -> bool:
        """Whether the ranks validate in step (`data.lockstep`): several ranks, parameters sharded."""
        trainer = self._trainer
        return trainer is not None and trainer.world_size > 1 and shards_parameters(trainer.strategy)

    def _throwaway_forward(self) -> None:
        """Both towers on a one-sample placeholder, the output dropped: a validation step without samples
        (padding, or only skip counts) still joins the other ranks' parameter gathers."""
        size = self.model.config.vision.image_size
        placeholder = {
            "image": torch.zeros(1, 3, size, size, device=self.device),
            "caption_ids": torch.ones(1, 2, dtype=torch.long, device=self.device),
        }
        encode_views(self.model, placeholder, ["image", "caption"])

    def on_validation_epoch_end(self) -> None:
        """Every rank joins one all-reduce of the epoch's sums, whatever its number of batches (none, say,
        when all its samples were skipped), and logs the same sample-weighted means and skip totals (every
        rank logs the same keys, so Lightning's `sync_dist` reduction of these equal values is safe)."""
        sums = self._val_sums
        if world()[1] > 1:
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
        loss, hits, samples, reports, *skipped = sums
        if samples > 0:
            self.log("val/loss_image_caption", loss / samples, sync_dist=True)
            self.log("val/acc_image_caption", hits / samples, sync_dist=True)
        if reports > 0:
            for reason, count in zip(SKIP_REASONS, skipped, strict=True):
                self.log(f"val/skipped_{reason}", count, sync_dist=True)

    # ---- optimizer -----------------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: per tower (and layer with layer_decay), decay / no-decay; frozen towers left out."""
        base_lr, weight_decay = optimizer_defaults(self.optimizer_factory, self.device)
        groups = []
        for tower in ("vision", "text"):
            if tower in self.frozen:
                continue
            named = list(getattr(self.model, tower).named_parameters())
            lr = self.lrs[tower] if self.lrs[tower] is not None else base_lr
            groups += tower_param_groups(tower, named, lr, weight_decay, self.layer_decay)
        temps = [("logit_scale", self.model.logit_scale)]
        temps += [(f"log_scales.{k}", p) for k, p in self.loss_fn.log_scales.items()]
        temp_lr = self.lrs["temperature"] if self.lrs["temperature"] is not None else base_lr
        groups += tower_param_groups("temperature", temps, temp_lr, 0.0)
        covered = {id(p) for g in groups for p in g["params"]}
        rest = [(n, p) for n, p in self.named_parameters() if p.requires_grad and id(p) not in covered]
        groups += tower_param_groups("other", rest, base_lr, weight_decay)
        return [g for g in groups if g["params"]]

    def configure_optimizers(self) -> dict[str, Any]:
        try:
            optimizer = self.optimizer_factory(self.param_groups())
        except OPTIMIZER_REFUSALS as error:
            raise TrainingConfigError(f"module.optimizer: {error}") from None
        total = self.schedule.total_steps or self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise TrainingConfigError(
                "cannot infer the number of training steps for the lr schedule: set trainer.max_steps or "
                "module.scheduler.total_steps"
            )
        if total <= 0:
            trainer = self.trainer
            raise TrainingConfigError(
                f"the run has no training step to schedule (trainer.max_steps={trainer.max_steps}, "
                f"max_epochs={trainer.max_epochs}, limit_train_batches={trainer.limit_train_batches})"
            )
        steps = self._schedule_steps = int(total)
        saved = self._restored_schedule_steps
        if saved is not None and saved != steps and self.global_rank == 0:
            log.warning(
                "resuming a run whose lr schedule was laid out for %d optimizer steps with one of %d "
                "(trainer.max_epochs or max_steps, the batch size, epoch_samples or the number of processes "
                "changed): the learning rate jumps to the new schedule's value at the resumed step",
                saved, steps,
            )
        lr_lambda = functools.partial(
            warmup_cosine,
            total_steps=steps,
            warmup_steps=self.schedule.warmup(steps),
            min_lr_ratio=self.schedule.min_lr_ratio,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
