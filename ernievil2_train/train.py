"""Build everything a composed config describes and fit it."""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from traceback import walk_tb
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from ernievil2_train.callbacks.monitors import (
    LIGHTNING_METRICS,
    RETRIEVAL_METRICS,
    check_monitors,
    check_retrieval_timing,
    missing_monitor_error,
)
from ernievil2_train.callbacks.retrieval import PREFIX as RETRIEVAL_PREFIX
from ernievil2_train.callbacks.retrieval import RetrievalCallback
from ernievil2_train.config_checks import (
    ConfigError,
    check_added_keys,
    check_argument_types,
    check_config,
)
from ernievil2_train.cpu_threads import cores_shared
from ernievil2_train.data.fit import check_data_fits_model
from ernievil2_train.data.views import ViewConfig
from ernievil2_train.distributed import is_first_process
from ernievil2_train.resume import (
    check_checkpoint_fits,
    check_layout_fits,
    interrupted,
    resume_checkpoint,
)
from ernievil2_train.text.vocab import same_token_ids
from ernievil2_train.warnings_filter import quiet_known_warnings, quiet_resume_warnings

log = logging.getLogger(__name__)
RUN_CONFIG_DIR = ".hydra"  # where a run folder records its config (written once a run is accepted)
# what a constructor raises for a bad setting (ImportError: an accelerator or strategy not installed)
SETTING_ERRORS = (FileNotFoundError, ImportError, ValueError, TypeError, MisconfigurationException)


NO_GPU_HINT = " (no GPU here: add trainer=cpu to the command)"


def build(key: str, node: DictConfig, **kwargs: Any) -> Any:
    """`instantiate(node)`, where a value of the wrong type, a missing file or an invalid argument becomes a
    `ConfigError` naming `key`."""
    check_argument_types(key, node)
    try:
        return instantiate(node, **kwargs)
    except (InstantiationException, InterpolationResolutionError) as error:
        cause = error.__cause__ or error.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        if isinstance(cause, SETTING_ERRORS):
            hint = NO_GPU_HINT if key == "trainer" and "No supported gpu backend" in str(cause) else ""
            raise ConfigError(f"config key '{key}': {cause}{hint}") from None
        raise


def _build_group(name: str, group: DictConfig | None) -> dict[str, Any]:
    """Build each entry of a name -> config mapping (callbacks, loggers); `null` entries are skipped."""
    if not group:
        return {}
    return {key: build(f"{name}.{key}", node) for key, node in group.items() if node and "_target_" in node}


VOCAB_KEYS = ("callbacks.retrieval.vocab_file", "callbacks.export.vocab_file")  # beside the training data's


def check_one_vocabulary(cfg: DictConfig) -> None:
    """Training data, zero-shot retrieval and the export must read one vocabulary: the export ships the
    model with its `vocab.txt`, and other token ids than training's would mean other tokens to it."""
    training = OmegaConf.select(cfg, "data.datamodule.vocab_file")
    if not isinstance(training, str) or not Path(training).is_file():
        return
    for key in VOCAB_KEYS:
        other = OmegaConf.select(cfg, key)
        if isinstance(other, str) and Path(other).is_file() and not same_token_ids(other, training):
            raise ConfigError(
                f"config keys 'data.datamodule.vocab_file' ({training}) and '{key}' ({other}): other token "
                "ids; training, evaluation and export read one vocabulary (set data.vocab_file, which all "
                "take)")


def check_run_mode() -> None:
    """A SLURM launcher submits jobs only in a multirun (`-m`); without it Hydra runs the job right here."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    launcher = hydra_cfg.runtime.choices.get("hydra/launcher") or ""
    if "slurm" in launcher and hydra_cfg.mode == RunMode.RUN:
        raise ConfigError(f"hydra/launcher={launcher} submits SLURM jobs only with -m (multirun); without it "
                          "the run would train here, on this machine")


def settle_accumulation(cfg: DictConfig) -> None:
    """Lightning's `trainer.accumulate_grad_batches` is refused (see `ErnieVil2Module.on_fit_start`). With
    `module.accumulate_microbatches` k > 1: not under FSDP, and the batch size must split into k equal
    micro-batches."""
    lightning_k = cfg.trainer.get("accumulate_grad_batches", 1)
    if isinstance(lightning_k, int) and lightning_k > 1:
        raise ConfigError(
            f"config key 'trainer.accumulate_grad_batches': {lightning_k} does not give the gradient of a "
            "bigger contrastive batch (negatives never meet across accumulated batches); set it to 1 and use "
            "module.accumulate_microbatches (feature-cache accumulation) instead"
        )
    k = cfg.module.get("accumulate_microbatches", 1)
    if not isinstance(k, int) or k <= 1:
        return
    strategy = cfg.trainer.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy or "")
    if "fsdp" in target.lower():
        raise ConfigError(
            f"config key 'module.accumulate_microbatches': {k} micro-batches do not run under FSDP (the "
            "feature cache back-propagates inside FSDP's forward); set it to 1 and, for memory, "
            "module.grad_checkpointing=true"
        )
    batch_size = cfg.data.datamodule.get("batch_size")
    if isinstance(batch_size, int) and batch_size % k:
        raise ConfigError(
            f"config key 'module.accumulate_microbatches': {k} does not divide data.datamodule.batch_size="
            f"{batch_size} into equal micro-batches"
        )


def settle_clipping(cfg: DictConfig) -> None:
    """Move `trainer.gradient_clip_val` to `module.gradient_clip_val`: the module clips every way it trains,
    where Lightning cannot (feature-cache accumulation), refuses to (a fused optimizer under mixed precision,
    norm clipping under FSDP) or can. Refuse a fused optimizer with fp16 mixed precision and clipping: it
    unscales the gradients inside its step, after the clipping. The module clips the global norm: another
    `trainer.gradient_clip_algorithm` is refused."""
    algorithm = cfg.trainer.get("gradient_clip_algorithm")
    if algorithm not in (None, "norm"):
        raise ConfigError(
            f"config key 'trainer.gradient_clip_algorithm': {algorithm!r}, but gradients are clipped by "
            "their global norm (at trainer.gradient_clip_val); remove the key or set it to norm"
        )
    clip = cfg.trainer.get("gradient_clip_val")
    if clip is None or clip == 0:
        cfg.trainer.gradient_clip_val = None
        return
    fused = OmegaConf.select(cfg, "module.optimizer.fused", default=False)
    if fused is True and str(cfg.trainer.get("precision", "")).startswith("16"):
        raise ConfigError(
            f"config key 'module.optimizer.fused': a fused optimizer unscales fp16 gradients inside its "
            f"step, after trainer.gradient_clip_val={clip} would clip them; use "
            f"trainer.precision=bf16-mixed, module.optimizer.fused=false or trainer.gradient_clip_val=null"
        )
    if cfg.module.get("gradient_clip_val") is None:
        cfg.module.gradient_clip_val = clip
    cfg.trainer.gradient_clip_val = None


def without_retrieval_checkpoints(callbacks: list[Any]) -> list[Any]:
    """`callbacks`, less the checkpoints that keep the best epoch by a `retrieval/` metric when no zero-shot
    evaluation logs it (no eval set): Lightning would stop the run at the first epoch end. The last
    checkpoint stays, and the export is the final model."""
    if any(isinstance(c, RetrievalCallback) and c.eval_set is not None for c in callbacks):
        return callbacks
    unmonitored = [c for c in callbacks
                   if isinstance(c, ModelCheckpoint) and str(c.monitor or "").startswith(RETRIEVAL_PREFIX)]
    if unmonitored:
        log.info("no eval set: no checkpoint of the best epoch by %s (the last checkpoint is kept, the final "
                 "model exported)", unmonitored[0].monitor)
    return [c for c in callbacks if not any(c is u for u in unmonitored)]


def log_within_an_epoch(trainer: pl.Trainer, datamodule: Any) -> None:
    """Log the training metrics every `steps` of an epoch when an epoch has fewer steps than
    `trainer.log_every_n_steps` (a small set of one's own): Lightning would log none of them."""
    batches_per_rank = getattr(datamodule, "batches_per_rank", None)
    if batches_per_rank is None:
        return
    steps = batches_per_rank(trainer.world_size)
    if 0 < steps < trainer.log_every_n_steps:
        log.info("an epoch has %d training step(s), fewer than trainer.log_every_n_steps=%d: logging every "
                 "%d step(s)", steps, trainer.log_every_n_steps, steps)
        trainer.log_every_n_steps = steps


def check_callbacks(
    callbacks: dict[str, Any], cfg: DictConfig, model: Any, module: Any, datamodule: Any
) -> None:
    """The callbacks' settings against the model, the metrics the run logs and when it logs them."""
    check_callbacks_fit_model(callbacks, model)
    if hasattr(module, "logged_metrics"):
        validates = getattr(datamodule, "val_urls", None) is not None
        check_monitors(callbacks, module.logged_metrics(validates) | RETRIEVAL_METRICS | LIGHTNING_METRICS)
    interval = cfg.trainer.get("val_check_interval")  # an int counts batches, a float a share of the epoch
    per_epoch = interval is None or (isinstance(interval, float) and interval == 1.0)
    check_retrieval_timing(callbacks, per_epoch and cfg.trainer.get("check_val_every_n_epoch", 1) == 1)


def check_callbacks_fit_model(callbacks: dict[str, Any], model: Any) -> None:
    """Refuse a zero-shot evaluation at another image size than the model's (it would fail at its first
    batch, at the baseline or after the first epoch)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    wanted = config.vision.image_size
    for key, callback in callbacks.items():
        size = callback.image_size if isinstance(callback, RetrievalCallback) else None
        if size is not None and size != wanted:
            raise ConfigError(
                f"config key 'callbacks.{key}.image_size': {size}, but the model takes {wanted}-pixel images "
                f"(set it to {wanted}, or null for the model's)"
            )


def save_run_config(cfg: DictConfig, output_dir: Path) -> None:
    """Write the run's config into `<run folder>/.hydra/` (config.yaml, hydra.yaml, overrides.yaml, as Hydra
    writes them) once the run is accepted, from the first process only. Hydra's own early writing is off
    (`hydra.output_subdir: null`), so a refused resume leaves the record of the run it refused untouched."""
    if not HydraConfig.initialized() or not is_first_process():
        return
    hydra_cfg = HydraConfig.get()
    folder = output_dir / RUN_CONFIG_DIR
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), folder / "hydra.yaml")
    OmegaConf.save(hydra_cfg.overrides.task, folder / "overrides.yaml")


def train(cfg: DictConfig) -> dict[str, float]:
    """Seed, instantiate data, model, module, callbacks, loggers and trainer from `cfg`, then fit."""
    quiet_known_warnings()
    check_config(cfg)
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        check_added_keys(cfg, OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False), hydra_cfg)
    check_one_vocabulary(cfg)
    check_run_mode()
    settle_accumulation(cfg)
    settle_clipping(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # told once the run is accepted
    output_dir = Path(cfg.paths.output_dir)

    datamodule = build("data.datamodule", cfg.data.datamodule)
    model = build("model", cfg.model)
    check_data_fits_model(datamodule, model, cfg.model.get("checkpoint"))
    module = build("module", cfg.module, model=model)
    views = getattr(datamodule, "views", None)
    if isinstance(views, ViewConfig) and hasattr(module, "check_batch_keys"):
        module.check_batch_keys(views.train_batch_keys())  # before the zero-shot baseline, not at step 1
    ckpt_path = resume_checkpoint(cfg.get("ckpt_path"), output_dir)
    if ckpt_path:
        what = "config key 'ckpt_path'" if cfg.get("ckpt_path") else "run folder checkpoint"
        ignored = check_checkpoint_fits(
            ckpt_path, module, what, cfg.trainer.get("max_epochs"), cfg.trainer.get("max_steps")
        )
        log.info("resuming from %s", ckpt_path)
        quiet_resume_warnings()
        if ignored:
            log.warning("resuming keeps the optimizer state of %s (learning rate, weight decay and betas "
                        "included); changed settings have no effect: %s (start a new run folder to use them)",
                        ckpt_path, "; ".join(ignored))
    built_callbacks = _build_group("callbacks", cfg.get("callbacks"))
    check_callbacks(built_callbacks, cfg, model, module, datamodule)
    callbacks = without_retrieval_checkpoints(list(built_callbacks.values()))
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = list(_build_group("logger", cfg.get("logger")).values())
    if not loggers:  # Lightning refuses a learning-rate monitor without a logger to write to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: pl.Trainer = build("trainer", cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if ckpt_path:
        check_layout_fits(ckpt_path, datamodule, trainer.world_size)
    log_within_an_epoch(trainer, datamodule)
    save_run_config(cfg, output_dir)

    log.info("Seed set to %s", cfg.seed)
    if cfg.module.get("gradient_clip_val") is not None:
        log.info("gradients clipped by the module at %s", cfg.module.gradient_clip_val)
    hparams = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(hparams)

    with wandb_run_finished(loggers), cores_shared(trainer, getattr(datamodule, "num_workers", 0)):
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except SystemExit as exit_:
            if exit_.code == 1 and trainer.interrupted:  # how Lightning ends after its shutdown on Ctrl-C
                raise interrupted(output_dir) from None
            raise
        except ValueError as error:
            if "`val_check_interval`" not in str(error):
                raise
            raise validation_interval_error(trainer) from None
        except (RuntimeError, MisconfigurationException) as error:
            logged = list(trainer.callback_metrics)
            refusal = missing_monitor_error(error, built_callbacks, logged)
            if refusal is None and isinstance(error, RuntimeError):
                refusal = out_of_memory_error(error, cfg)
            if refusal is None:
                raise
            raise refusal from None
    return {key: float(value) for key, value in trainer.callback_metrics.items()}


def validation_interval_error(trainer: pl.Trainer) -> ConfigError:
    """Lightning's refusal of a `val_check_interval` above the batches of an epoch (told only once the
    training data is loaded), as the config keys that fix it."""
    batches = trainer.fit_loop.max_batches
    return ConfigError(
        f"config key 'trainer.val_check_interval': {trainer.val_check_interval} batches is more than the "
        f"{batches} of an epoch; set at most {batches}, or trainer.check_val_every_n_epoch=null to count "
        "batches across epochs"
    )


def out_of_memory_error(error: RuntimeError, cfg: DictConfig) -> ConfigError | None:
    """An allocation that failed (torch's out-of-memory error on a GPU, the allocator's `RuntimeError` on
    CPU) as the batch size that asked for it and what lowers it, a data loader worker the system killed as
    the worker count; None for any other error."""
    message = str(error)
    died = re.match(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (.+?)\.?\s*$", message)
    if died:  # "is killed by signal: Killed", "exited unexpectedly"
        return ConfigError(
            f"config key 'data.datamodule.num_workers': a data loader worker (pid {died.group(1)}) "
            f"{died.group(2)} (out of memory, likely); lower it or data.datamodule.batch_size")
    gpu = isinstance(error, torch.OutOfMemoryError)
    if not gpu and "can't allocate memory" not in message and "not enough memory" not in message:
        return None
    retrieval = inspect.getfile(RetrievalCallback)
    in_retrieval = any(frame.f_code.co_filename == retrieval for frame, _ in walk_tb(error.__traceback__))
    key = "callbacks.retrieval.batch_size" if in_retrieval else "data.datamodule.batch_size"
    advice = "lower it" if in_retrieval else (
        "lower it, or set module.accumulate_microbatches=K to run each batch as K micro-batches (the same "
        "loss), or module.grad_checkpointing=true"
    )
    gib = re.search(r"tried to allocate ([\d.]+ [KMGT]iB)", message, re.IGNORECASE)
    size = re.search(r"tried to allocate (\d+) bytes", message)
    asked = gib.group(1) if gib else f"{int(size.group(1)) / 2**20:.0f} MiB" if size else "memory"
    where = "GPU" if gpu else "CPU"
    return ConfigError(f"config key '{key}': out of {where} memory at {OmegaConf.select(cfg, key)} samples "
                       f"per batch (an allocation of {asked} failed); {advice}")


@contextlib.contextmanager
def wandb_run_finished(loggers: list[Any]) -> Iterator[None]:
    """End this process's W&B run after the block: the next job of a multirun sweep (same process) then
    starts its own instead of logging into this one. Exit code 0 when the block ends normally or by a
    `SystemExit(0)` (a SLURM requeue: the run goes on in the requeued job), else 1: a SIGTERM stop too
    (Lightning's `SystemExit` without a code), which leaves the run unfinished until it is resumed."""
    try:
        yield
    except SystemExit as exit_:
        _finish_wandb_run(loggers, not isinstance(exit_, SIGTERMException) and exit_.code in (0, None))
        raise
    except BaseException:
        _finish_wandb_run(loggers, False)
        raise
    _finish_wandb_run(loggers, True)


def _finish_wandb_run(loggers: list[Any], finished: bool) -> None:
    if not any(isinstance(logger, WandbLogger) for logger in loggers):
        return
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=0 if finished else 1)
