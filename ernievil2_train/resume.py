"""Resuming a run: which checkpoint it continues from, whether that checkpoint fits the run's model, and
what a Ctrl-C leaves to resume from."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ernievil2_train.checkpoints.errors import CheckpointError, state_mismatch
from ernievil2_train.checkpoints.io import MODEL_CONFIG_KEY, SHARDED_META_NAME, read_training_checkpoint
from ernievil2_train.config_checks import ConfigError


def resume_checkpoint(ckpt_path: str | None, output_dir: Path) -> str | None:
    """The checkpoint to resume from.

    `None`: the newest of the run folder's SLURM requeue checkpoint (`hpc_ckpt_*.ckpt`) and
    `checkpoints/last.ckpt`, if any; `"last"`: the run folder's last checkpoint, which must exist;
    anything else: that path. A checkpoint is a file, or a folder when FSDP saves it sharded.
    """
    newest = newest_checkpoint(output_dir)
    if ckpt_path is None:
        return _readable(newest, f"run folder checkpoint {newest}; delete it or set ckpt_path")
    if ckpt_path == "last":
        if newest is None:
            raise ConfigError(f"config key 'ckpt_path': no last checkpoint in {output_dir}")
        return _readable(newest, f"config key 'ckpt_path': {newest}")
    if not Path(ckpt_path).exists():
        raise ConfigError(f"config key 'ckpt_path': checkpoint not found: {ckpt_path}")
    return _readable(ckpt_path, f"config key 'ckpt_path': {ckpt_path}")


def newest_checkpoint(output_dir: Path) -> str | None:
    """The newer of the run folder's SLURM requeue checkpoint (`hpc_ckpt_*.ckpt`) and its
    `checkpoints/last.ckpt`; None without either."""
    candidates = [*output_dir.glob("hpc_ckpt_*.ckpt"), output_dir / "checkpoints" / "last.ckpt"]
    existing = [path for path in candidates if path.exists()]
    return str(max(existing, key=lambda p: p.stat().st_mtime)) if existing else None


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C ended the training (Lightning shut it down and exited); the message says how to resume."""


def interrupted(output_dir: Path) -> TrainingInterrupted:
    """What a Ctrl-C leaves: the run folder's newest checkpoint, which `ckpt_path=last` resumes from."""
    newest = newest_checkpoint(output_dir)
    if newest is None:
        return TrainingInterrupted("no checkpoint was saved yet")
    return TrainingInterrupted(f"ckpt_path=last hydra.run.dir={output_dir} resumes from {newest}")


def _readable(path: str | None, what: str) -> str | None:
    """`path`, unless it is a file `torch.save` cannot have written whole (every such file is a zip archive;
    a truncated one has lost its directory at the end), not a regular file (a pipe would be waited on for
    ever), or a folder other than a sharded FSDP checkpoint."""
    if path is None:
        return None
    if Path(path).is_dir():
        if not (Path(path) / SHARDED_META_NAME).is_file():
            raise ConfigError(f"{what}: a folder, not a checkpoint (a .ckpt file, or the folder FSDP saves)")
        return path
    if not Path(path).is_file():
        raise ConfigError(f"{what}: not a regular file")
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{what}: not a readable checkpoint (truncated, or not written by torch.save)")
    return path


def check_checkpoint_fits(ckpt_path: str, module: pl.LightningModule, source: str) -> None:
    """Refuse a training checkpoint whose weights this run's module cannot load (another model size or
    preset), naming the model settings that differ; `source` says where the path came from. Reads the file
    memory-mapped: no tensor data is read. Folders (sharded FSDP checkpoints) are left to Lightning."""
    if Path(ckpt_path).is_dir():
        return
    try:
        checkpoint = read_training_checkpoint(ckpt_path)
    except CheckpointError as error:
        raise ConfigError(f"{source}: {error}") from None
    mismatch = state_mismatch(module.state_dict(), checkpoint["state_dict"])
    if not mismatch:
        return
    config = getattr(getattr(module, "model", None), "config", None)
    differing = _differing_settings(checkpoint.get(MODEL_CONFIG_KEY), config.to_dict() if config else None)
    raise ConfigError(f"{source}: {ckpt_path}: holds another model than this run's ({differing or mismatch})")


def _differing_settings(saved: Any, current: dict[str, Any] | None) -> str:
    """`'vision.width 64 there, 32 here; ...'` for the model settings two config dicts disagree on."""
    if not isinstance(saved, dict) or current is None:
        return ""
    changes = []
    for tower, settings in current.items():
        old = saved.get(tower)
        if not isinstance(settings, dict) or not isinstance(old, dict):
            continue
        changes += [f"{tower}.{k} {old.get(k)} there, {v} here"
                    for k, v in settings.items() if old.get(k) != v]
    return "; ".join(changes)


RUN_CONFIG_DIR = ".hydra"  # where a run folder records its config (written once a run is accepted)
RESTORED_SETTINGS = ("module.optimizer",)  # what a resume takes from the checkpoint, whatever the config says


def settings_a_resume_ignores(cfg: DictConfig, output_dir: Path) -> list[str]:
    """This run's optimizer settings that differ from those the run folder's recorded config
    (`.hydra/config.yaml`) holds, as `'module.optimizer.lr 0.001 there, 0.01 here'`: a resumed run continues
    with the optimizer state its checkpoint saved, learning rate, weight decay and betas included."""
    recorded = output_dir / RUN_CONFIG_DIR / "config.yaml"
    if not recorded.is_file():
        return []
    try:
        before = OmegaConf.load(recorded)
    except (OSError, ValueError, OmegaConfBaseException):
        return []
    changes = []
    for key in RESTORED_SETTINGS:
        old, new = (_leaves(OmegaConf.select(config, key, default=None)) for config in (before, cfg))
        changes += [f"{key}.{name} {old.get(name)} there, {new.get(name)} here"
                    for name in sorted(old.keys() | new.keys()) if old.get(name) != new.get(name)]
    return changes


def _leaves(node: Any) -> dict[str, Any]:
    """A config node's values by dotted name (`{}` for a missing node; interpolations left unresolved)."""
    return _flat(OmegaConf.to_container(node, resolve=False)) if isinstance(node, DictConfig) else {}


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict by dotted name."""
    flat: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat
