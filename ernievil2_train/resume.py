"""Resuming a run: which checkpoint it continues from, whether that checkpoint fits the run's model, and
what a Ctrl-C leaves to resume from."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from ernievil2_train.checkpoints.errors import CheckpointError, state_mismatch
from ernievil2_train.checkpoints.io import MODEL_CONFIG_KEY, SHARDED_META_NAME, read_training_checkpoint
from ernievil2_train.config_checks import ConfigError
from ernievil2_train.losses.infonce import LossConfig
from ernievil2_train.optim import OPTIMIZER_REFUSALS


def resume_checkpoint(ckpt_path: str | None, output_dir: Path) -> str | None:
    """The checkpoint to resume from.

    `None`: the newest of the run folder's SLURM requeue checkpoint (`hpc_ckpt_*.ckpt`) and
    `checkpoints/last.ckpt`, if any; `"last"`: the run folder's last checkpoint, which must exist;
    anything else: that path. A checkpoint is a file, or a folder when FSDP saves it sharded.
    """
    if ckpt_path is not None:
        ckpt_path = str(ckpt_path)  # a file named 123 reaches here as a number
    if ckpt_path == "":
        raise ConfigError("config key 'ckpt_path': empty; give a checkpoint, last, or null (the run folder's "
                          "checkpoint if it has one)")
    newest = newest_checkpoint(output_dir)
    if ckpt_path is None:
        return _readable(newest, f"run folder checkpoint {newest}; delete it or set ckpt_path")
    if ckpt_path == "last":
        if newest is None:
            raise ConfigError(f"config key 'ckpt_path': no last checkpoint in {output_dir} (run folders are "
                              "named by the time: resume one with hydra.run.dir=<its folder>)")
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
    a truncated one has lost its directory at the end; a damaged one fails the members' checksums), not a
    regular file (a pipe would be waited on for ever), or a folder other than a sharded FSDP checkpoint."""
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
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # reads every member: CRC-32 at disk speed
    except (zipfile.BadZipFile, OSError) as error:
        damaged = str(error)
    if damaged:
        raise ConfigError(f"{what}: damaged ({damaged} fails its checksum); resume from another checkpoint")
    return path


def check_checkpoint_fits(
    ckpt_path: str,
    module: pl.LightningModule,
    source: str,
    max_epochs: int | None = None,
    max_steps: int | None = None,
) -> list[str]:
    """Refuse a training checkpoint this run's module cannot continue from: weights of another model size or
    preset (naming the model settings that differ), other losses, weights without an optimizer state, an
    optimizer state of other parameter groups (a tower frozen or unfrozen, layer-wise lr decay turned on or
    off), or one that has trained `max_epochs` epochs or `max_steps` steps already (Lightning would end
    without a step, or refuse it only after overwriting the checkpoint); `source` says where the path came
    from.
    Returns the optimizer settings the checkpoint's state keeps over this run's config (see
    `_optimizer_settings_kept`). Reads the file memory-mapped: no tensor data is read. Folders (sharded FSDP
    checkpoints) are left to Lightning."""
    if Path(ckpt_path).is_dir():
        return []
    try:
        checkpoint = read_training_checkpoint(ckpt_path)
    except CheckpointError as error:
        raise ConfigError(f"{source}: {error}") from None
    here, there = module.state_dict(), checkpoint["state_dict"]
    mismatch = state_mismatch(_part(here, loss=False), _part(there, loss=False))
    if mismatch:
        config = getattr(getattr(module, "model", None), "config", None)
        saved = checkpoint.get(MODEL_CONFIG_KEY)
        differing = _differing_settings(saved, config.to_dict() if config else None)
        reason = differing or mismatch
        raise ConfigError(f"{source}: {ckpt_path}: holds another model than this run's ({reason})")
    mismatch = state_mismatch(_part(here, loss=True), _part(there, loss=True))
    if mismatch:
        reason = _loss_settings_changed(checkpoint, module) or mismatch
        raise ConfigError(
            f"{source}: {ckpt_path}: was trained with other losses than this run's ({reason}): resume with "
            f"the module.loss.weights and module.loss.temperature it was trained with, or start a new run "
            "folder"
        )
    _check_training_left(checkpoint, f"{ckpt_path} ({source})", max_epochs, max_steps)
    if OPTIMIZER_STATES not in checkpoint:
        raise ConfigError(
            f"{source}: {ckpt_path}: holds weights only (no optimizer state to resume); to start a new run "
            f"from them, export it (python -m ernievil2_train.export {ckpt_path} DIR) and set "
            f"model.checkpoint=DIR"
        )
    return _optimizer_settings_kept(checkpoint, module, f"{source}: {ckpt_path}")


def check_layout_fits(ckpt_path: str, datamodule: Any, world_size: int) -> None:
    """Refuse, before the run writes anything, a checkpoint saved within an epoch that this run's data
    settings would lay out otherwise (`check_resumable` of the datamodule, which runs it again when Lightning
    restores its state). Folders (sharded FSDP checkpoints) are checked then only."""
    check = getattr(datamodule, "check_resumable", None)
    if check is None or Path(ckpt_path).is_dir():
        return
    state = read_training_checkpoint(ckpt_path).get(type(datamodule).__qualname__)
    if isinstance(state, dict):
        check(state, world_size)


def epochs_trained(checkpoint: dict[str, Any]) -> int | None:
    """The training epochs a Lightning checkpoint has finished (its `epoch` is the one it was saved in,
    finished or not: an epoch's end and its last batch before validation both save that epoch's number)."""
    try:
        done = checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]
    except (KeyError, TypeError):
        return None
    return done if isinstance(done, int) else None


def _check_training_left(
    checkpoint: dict[str, Any], what: str, max_epochs: int | None, max_steps: int | None
) -> None:
    """`ConfigError` when the checkpoint has already trained as many epochs or steps as the run is set to."""
    epochs = epochs_trained(checkpoint)
    if isinstance(max_epochs, int) and max_epochs >= 0 and epochs is not None and epochs >= max_epochs:
        raise ConfigError(
            f"config key 'trainer.max_epochs': {max_epochs}, but {what} has trained {epochs} epoch(s): "
            f"nothing is left to train; resume with trainer.max_epochs={epochs + 1} or more, or start a new "
            "run folder"
        )
    steps = checkpoint.get("global_step")
    if isinstance(max_steps, int) and max_steps > 0 and isinstance(steps, int) and steps >= max_steps:
        raise ConfigError(
            f"config key 'trainer.max_steps': {max_steps}, but {what} has trained {steps} step(s): nothing "
            f"is left to train; resume with a larger trainer.max_steps, or start a new run folder"
        )


LOSS_PREFIX = "loss_fn."  # the loss's own state (one learned temperature per active loss)


def _part(state: dict[str, Any], loss: bool) -> dict[str, Any]:
    """The loss's entries of a module state dict, or (loss=False) all the others."""
    return {name: value for name, value in state.items() if name.startswith(LOSS_PREFIX) == loss}


def _loss_settings_changed(checkpoint: dict[str, Any], module: pl.LightningModule) -> str:
    """`'module.loss.temperature per_pair there, shared here'` for the loss settings that give the loss its
    learned temperatures (the pairs on, the temperature mode) where the checkpoint's saved ones differ from
    this run's; "" when the checkpoint saved none that can be read."""
    config = getattr(getattr(module, "loss_fn", None), "config", None)
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(config, LossConfig) or not isinstance(hparams, dict):
        return ""
    try:
        saved = LossConfig.from_any(hparams.get("loss"))
    except (TypeError, ValueError):
        return ""
    changes = []
    if saved.active_pairs() != config.active_pairs():
        changes.append(f"module.loss.weights: pairs {', '.join(saved.active_pairs())} there, "
                       f"{', '.join(config.active_pairs())} here")
    if saved.temperature != config.temperature:
        changes.append(f"module.loss.temperature {saved.temperature} there, {config.temperature} here")
    return "; ".join(changes)


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


OPTIMIZER_STATES = "optimizer_states"  # where a Lightning checkpoint keeps its optimizers' state dicts
# Parameter-group entries that are not settings a config chooses (`lr` is compared as the scheduler's base).
NOT_SETTINGS = frozenset(
    {"params", "param_names", "name", "lr", "initial_lr", "foreach", "fused", "capturable", "differentiable"}
)


def _fresh_param_groups(module: pl.LightningModule) -> list[dict[str, Any]] | None:
    """The parameter groups of the optimizer this run's config makes, as its state dict holds them; None for
    a module without `optimizer_factory` and `param_groups`, or settings the optimizer refuses (reported
    when training starts)."""
    factory, groups = getattr(module, "optimizer_factory", None), getattr(module, "param_groups", None)
    if factory is None or groups is None:
        return None
    try:
        return factory(groups()).state_dict()["param_groups"]
    except OPTIMIZER_REFUSALS:
        return None


def _optimizer_settings_kept(checkpoint: dict[str, Any], module: pl.LightningModule, what: str) -> list[str]:
    """A resume loads the optimizer state the checkpoint saved, learning rates, weight decay and betas
    included: this run's settings that differ from the saved ones, as `'lr 0.001 there, 0.01 here (all 6
    groups)'`. Parameter groups that differ in number, names or sizes cannot be loaded: `ConfigError`."""
    states, current = checkpoint.get(OPTIMIZER_STATES), _fresh_param_groups(module)
    saved = states[0].get("param_groups") if isinstance(states, list) and len(states) == 1 else None
    if current is None or not isinstance(saved, list) or not all(isinstance(g, dict) for g in saved):
        return []
    if [(g.get("name"), len(g.get("params", ()))) for g in saved] != [
        (g.get("name"), len(g["params"])) for g in current
    ]:
        raise ConfigError(
            f"{what}: its optimizer state has other parameter groups than this run's ({len(saved)} there, "
            f"{len(current)} here): resume with the module.freeze_vision, module.freeze_text and "
            f"module.layer_decay it was trained with, or start a new run folder"
        )
    differing: dict[tuple[str, str, str], list[str]] = {}
    for old, new in zip(saved, current, strict=True):
        for key in ["lr", *sorted(new.keys() - NOT_SETTINGS)]:
            before = old.get("initial_lr", old.get("lr")) if key == "lr" else old.get(key)
            if _setting(before) != _setting(new.get(key)):
                pair = (key, str(_setting(before)), str(_setting(new.get(key))))
                differing.setdefault(pair, []).append(str(new.get("name")))
    return [f"{key} {before} there, {after} here ({_groups(names, len(current))})"
            for (key, before, after), names in differing.items()]


def _setting(value: Any) -> Any:
    """A group setting in a comparable form: sequences (betas) as tuples, tensors as numbers."""
    if isinstance(value, list | tuple):
        return tuple(_setting(v) for v in value)
    return value.tolist() if hasattr(value, "tolist") else value


def _groups(names: list[str], total: int) -> str:
    """`all 6 groups`, or the names of the groups, the first three and a count of the rest."""
    if len(names) == total:
        return f"all {total} groups" if total > 1 else names[0]
    shown = ", ".join(names[:3])
    return f"{shown} and {len(names) - 3} more" if len(names) > 3 else shown
