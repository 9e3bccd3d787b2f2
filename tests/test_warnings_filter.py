"""`quiet_known_warnings`: which third-party warnings and notices it hides, and which it keeps."""

from __future__ import annotations

import logging
import sys
import warnings

import pytest
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from ernievil2_train.warnings_filter import (
    CPP_EXTENSION_LOGGER,
    RANK_ZERO_LOGGERS,
    SIGNAL_LOGGER,
    quiet_known_warnings,
    quiet_resume_warnings,
)


@pytest.fixture(autouse=True)
def _keep_logger_filters():
    """`quiet_known_warnings` adds a filter to Lightning's loggers: remove it after each test."""
    names = (*RANK_ZERO_LOGGERS, CPP_EXTENSION_LOGGER)
    kept = {logger: list(logger.filters) for logger in map(logging.getLogger, names)}
    yield
    for logger, filters in kept.items():
        logger.filters[:] = filters


LEAFSPEC = ("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
            "treespec.is_leaf()` instead.")
ALL_GATHER = ("torch.distributed.nn.functional.all_gather is deprecated, use "
              "torch.distributed._functional_collectives.all_gather_single instead.")
ITERABLE_LEN = ("Your `IterableDataset` has `__len__` defined. In combination with multi-process data "
                "loading (when num_workers > 1), `__len__` could be inaccurate")

NO_VALIDATION = "Total length of `list` across ranks is zero. Please make sure this was your intention."


def _shown(message: str, category: type[Warning], module: str, resuming: bool = False) -> bool:
    """Whether a warning attributed to `module` gets through, after `quiet_known_warnings` (and
    `quiet_resume_warnings` when `resuming`)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        if resuming:
            quiet_resume_warnings()
        warnings.warn_explicit(message, category, "file.py", 1, module=module)
    return bool(caught)


@pytest.mark.parametrize(
    ("message", "category", "module", "shown"),
    [
        (LEAFSPEC, FutureWarning, "lightning.pytorch.utilities._pytree", False),
        (ALL_GATHER, FutureWarning, "lightning.fabric.utilities.distributed", False),
        (ITERABLE_LEN, UserWarning, "lightning.pytorch.utilities.data", False),
        (NO_VALIDATION, UserWarning, "lightning.pytorch.utilities.data", False),
        # an empty validation loader that is not the no-validation `[]`
        ("Total length of `DataLoader` across ranks is zero.", UserWarning, "lightning.pytorch.data", True),
        (ALL_GATHER, FutureWarning, "my_project.losses", True),  # the user's own call
        (ITERABLE_LEN, DeprecationWarning, "lightning.pytorch.utilities.data", True),
        ("`Trainer(foo=...)` is deprecated", FutureWarning, "lightning.pytorch.trainer", True),
        ("The number of training batches (2) is smaller than the logging interval", UserWarning,
         "lightning.pytorch.loops.fit_loop", True),
    ],
)
def test_only_known_warnings_are_ignored(message, category, module, shown, monkeypatch):
    monkeypatch.setattr(sys, "warnoptions", [])
    assert _shown(message, category, module) is shown


NOT_RESUMABLE = ("You're resuming from a checkpoint that ended before the epoch ended and your dataloader "
                 "is not resumable. This can cause unreliable results if further training is done.")
FOLDER_NOT_EMPTY = "Checkpoint directory /runs/a/checkpoints exists and is not empty."


@pytest.mark.parametrize(
    ("message", "category", "module"),
    [
        (NOT_RESUMABLE, PossibleUserWarning, "lightning.pytorch.loops.training_epoch_loop"),
        (FOLDER_NOT_EMPTY, UserWarning, "lightning.pytorch.callbacks.model_checkpoint"),
    ],
)
def test_lightnings_resume_notices_are_ignored_only_when_resuming(message, category, module, monkeypatch):
    monkeypatch.setattr(sys, "warnoptions", [])
    assert _shown(message, category, module)
    assert not _shown(message, category, module, resuming=True)
    assert _shown(message, category, "my_project.train", resuming=True)


def test_warnings_asked_for_on_the_command_line_are_kept(monkeypatch):
    monkeypatch.setattr(sys, "warnoptions", ["default"])
    assert _shown(LEAFSPEC, FutureWarning, "lightning.pytorch.utilities._pytree")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_the_litlogger_tip_is_dropped_and_other_rank_zero_messages_kept():
    logger, handler = logging.getLogger(RANK_ZERO_LOGGERS[0]), _Records()
    logger.addHandler(handler)
    try:
        quiet_known_warnings()
        logger.warning("💡 Tip: For seamless cloud logging and experiment tracking, try installing "
                       "[litlogger](https://pypi.org/project/litlogger/) to enable LitLogger.")
        logger.warning("GPU available: False, used: False")
    finally:
        logger.removeHandler(handler)
    assert handler.messages == ["GPU available: False, used: False"]


def test_lightnings_notes_on_stopping_are_dropped_ahead_of_the_runs_own_line():
    """A stopped run ends with one line of its own; Lightning's notes of the signal and of the exception it
    saved a checkpoint on are not printed before it."""
    rank_zero, signals = logging.getLogger(RANK_ZERO_LOGGERS[0]), logging.getLogger(SIGNAL_LOGGER)
    handler = _Records()
    for logger in (rank_zero, signals):
        logger.addHandler(handler)
    try:
        quiet_known_warnings()
        signals.info("[rank: 0] Received SIGTERM: 15")
        signals.info("Received SIGTERM: 15")
        rank_zero.info("An SIGTERMException was raised with message:         , saved checkpoint to x.ckpt")
        rank_zero.info("An TrainingDiverged was raised with message: NaN, saved checkpoint to x.ckpt")
        signals.info("Requeued SLURM job: 7")
        rank_zero.info("`Trainer.fit` stopped: `max_epochs=1` reached.")
    finally:
        for logger in (rank_zero, signals):
            logger.removeHandler(handler)
    assert handler.messages == ["Requeued SLURM job: 7", "`Trainer.fit` stopped: `max_epochs=1` reached."]


def test_torchs_no_cuda_runtime_note_is_dropped_and_its_other_messages_kept():
    logger, handler = logging.getLogger(CPP_EXTENSION_LOGGER), _Records()
    logger.addHandler(handler)
    try:
        quiet_known_warnings()
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        logger.warning("Error checking compiler version for %s", "c++")
    finally:
        logger.removeHandler(handler)
    assert handler.messages == ["Error checking compiler version for c++"]
