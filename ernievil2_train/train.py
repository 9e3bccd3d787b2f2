"""Build everything a composed config describes and fit it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from ernievil2_train.config_checks import ConfigError, check_config

log = logging.getLogger(__name__)


def build(key: str, node: DictConfig, **kwargs: Any) -> Any:
    """`instantiate(node)`, where a missing file or an invalid argument value becomes a `ConfigError` naming
    `key`."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        if isinstance(cause, (FileNotFoundError, ValueError)):
            raise ConfigError(f"config key '{key}': {cause}") from None
        raise


def _build_group(name: str, group: DictConfig | None) -> list[Any]:
    """Build each entry of a name -> config mapping (callbacks, loggers); `null` entries are skipped."""
    if not group:
        return []
    return [build(f"{name}.{key}", node) for key, node in group.items() if node and "_target_" in node]


def resume_checkpoint(ckpt_path: str | None, output_dir: Path) -> str | None:
    """The checkpoint to resume from.

    `None`: the newest of the run folder's SLURM requeue checkpoint (`hpc_ckpt_*.ckpt`) and
    `checkpoints/last.ckpt`, if any; `"last"`: the run folder's last checkpoint, which must exist;
    anything else: that path. A checkpoint is a file, or a folder when FSDP saves it sharded.
    """
    candidates = [*output_dir.glob("hpc_ckpt_*.ckpt"), output_dir / "checkpoints" / "last.ckpt"]
    existing = [path for path in candidates if path.exists()]
    newest = str(max(existing, key=lambda p: p.stat().st_mtime)) if existing else None
    if ckpt_path is None:
        return newest
    if ckpt_path == "last":
        if newest is None:
            raise ConfigError(f"config key 'ckpt_path': no last checkpoint in {output_dir}")
        return newest
    if not Path(ckpt_path).exists():
        raise ConfigError(f"config key 'ckpt_path': checkpoint not found: {ckpt_path}")
    return ckpt_path


def train(cfg: DictConfig) -> dict[str, float]:
    """Seed, instantiate data, model, module, callbacks, loggers and trainer from `cfg`, then fit."""
    check_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)

    datamodule = build("data.datamodule", cfg.data.datamodule)
    model = build("model", cfg.model)
    module = build("module", cfg.module, model=model)
    callbacks = _build_group("callbacks", cfg.get("callbacks"))
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = _build_group("logger", cfg.get("logger"))
    trainer: pl.Trainer = build("trainer", cfg.trainer, callbacks=callbacks, logger=loggers or False)

    hparams = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(hparams)

    ckpt_path = resume_checkpoint(cfg.get("ckpt_path"), output_dir)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return {key: float(value) for key, value in trainer.callback_metrics.items()}
