"""Start-up check of the metrics that callbacks monitor (best checkpoint, early stopping, export): a name the
run never logs would otherwise stop it with Lightning's traceback at the end of the first epoch."""

from __future__ import annotations

import difflib
from typing import Any

from ernievil2_train.callbacks.retrieval import LOGGED
from ernievil2_train.callbacks.retrieval import PREFIX as RETRIEVAL_PREFIX
from ernievil2_train.config_checks import ConfigError

RETRIEVAL_METRICS = frozenset(f"{RETRIEVAL_PREFIX}{name}" for name in LOGGED)
LIGHTNING_METRICS = frozenset({"epoch", "step"})
PROJECT_PREFIXES = ("train/", "val/", "data/", RETRIEVAL_PREFIX)
SKIP_COUNT = "skipped_"  # data/skipped_<reason>, val/skipped_<reason>: one per reason


def check_monitors(callbacks: dict[str, Any], logged: set[str] | frozenset[str]) -> None:
    """`ConfigError` naming `callbacks.<key>.monitor` for the first callback that monitors a metric not in
    `logged` (the names the run can log) when the name has one of the project's prefixes or is close to a
    logged one or to its last part (a typo). Any other name passes: a metric of the user's own callback."""
    for key, callback in callbacks.items():
        monitor = getattr(callback, "monitor", None)
        if not isinstance(monitor, str) or monitor in logged:
            continue
        close = _close_names(monitor, logged)
        if not close and not monitor.startswith(PROJECT_PREFIXES):
            continue
        if close:
            hint = f"did you mean {' or '.join(repr(name) for name in close)}?"
        else:
            prefix = monitor.split("/", 1)[0] + "/"
            same = sorted(name for name in logged if name.startswith(prefix))
            if same:
                hint = f"it logs {_listed(same, monitor)}"
            elif prefix == "val/":
                hint = "it has no validation data (data.datamodule.val_shards)"
            else:
                hint = f"it logs nothing under {prefix}"
        raise ConfigError(f"config key 'callbacks.{key}.monitor': this run never logs {monitor!r}; {hint}")


def check_retrieval_timing(callbacks: dict[str, Any], validates_once_per_epoch: bool) -> None:
    """`ConfigError` for a callback that would read a `retrieval/` metric at another time than a training
    epoch's end, where the zero-shot evaluation logs it: a checkpoint saved every N steps or minutes, or one
    (or an early stop) that acts after validation. It would act on the previous epoch's recall, or on none.
    Lightning acts at the epoch end by itself (setting None) only when validation runs once per epoch."""
    for key, callback in callbacks.items():
        monitor = getattr(callback, "monitor", None)
        if not isinstance(monitor, str) or not monitor.startswith(RETRIEVAL_PREFIX):
            continue
        stale = f"{monitor} is logged at the end of each training epoch only"
        for setting in ("every_n_train_steps", "train_time_interval"):
            if getattr(callback, f"_{setting}", None):
                raise ConfigError(f"config key 'callbacks.{key}.{setting}': {stale}; remove it")
        for setting in ("save_on_train_epoch_end", "check_on_train_epoch_end"):
            if not hasattr(callback, f"_{setting}"):
                continue
            at_epoch_end = getattr(callback, f"_{setting}")
            if at_epoch_end is False or (at_epoch_end is None and not validates_once_per_epoch):
                raise ConfigError(f"config key 'callbacks.{key}.{setting}': {stale}; set it to true")


def missing_monitor_error(
    error: Exception, callbacks: dict[str, Any], logged: list[str]
) -> ConfigError | None:
    """Lightning's refusal of a monitored metric that was not logged (a best checkpoint's, an early stop's),
    told at an epoch end, as the config key of the callback and the names that were `logged`; None for any
    other error. For names `check_monitors` lets through: a metric the user's own callback was to log."""
    message = str(error)
    for key, callback in callbacks.items():
        monitor = getattr(callback, "monitor", None)
        if not isinstance(monitor, str):
            continue
        if f"monitor={monitor!r}" in message or f"metric `{monitor}`" in message:
            return ConfigError(
                f"config key 'callbacks.{key}.monitor': no metric {monitor!r} was logged by the epoch's end; "
                f"the run logged {_listed(logged, monitor)}"
            )
    return None


def _close_names(monitor: str, logged: set[str] | frozenset[str]) -> list[str]:
    """Logged names close to `monitor`, or whose last part (after the prefix) is close to it."""
    close = difflib.get_close_matches(monitor, sorted(logged), n=3, cutoff=0.75)
    if close:
        return close
    by_last_part: dict[str, list[str]] = {}
    for name in sorted(logged):
        by_last_part.setdefault(name.split("/", 1)[-1], []).append(name)
    parts = difflib.get_close_matches(monitor, sorted(by_last_part), n=3, cutoff=0.75)
    return [name for part in parts for name in by_last_part[part]]


def _listed(names: list[str], monitor: str) -> str:
    """`names` for a message, the many per-reason skip counts as one item unless `monitor` is one of them."""
    if SKIP_COUNT in monitor:
        return ", ".join(names)
    kept = [name for name in names if SKIP_COUNT not in name]
    skips = sorted({name.split(SKIP_COUNT, 1)[0] for name in names if SKIP_COUNT in name})
    if skips:
        patterns = ", ".join(f"{prefix}{SKIP_COUNT}<reason>" for prefix in skips)
        kept.append(f"the skip counts ({patterns})")
    return ", ".join(kept)
