"""Silence the warnings and notices of third-party code that a user of this package cannot act on."""

from __future__ import annotations

import logging
import re
import sys
import warnings

# (message regex, category, regex of the module the warning is attributed to)
KNOWN_WARNINGS = (
    # Lightning's own use of torch's deprecated pytree API
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\."),
    # Lightning's all_gather calls torch's deprecated functional all_gather
    (r"torch\.distributed\.nn\.functional\.all_gather is deprecated", FutureWarning, r"lightning\."),
    # the data module's loaders have a length on purpose: it makes the virtual epochs
    (r"Your `IterableDataset` has `__len__` defined", UserWarning, r"lightning\."),
    # a run without val_shards has no validation loader on purpose: the zero-shot retrieval callback evaluates
    (r"Total length of `list` across ranks is zero", UserWarning, r"lightning\."),
)
# Lightning's notices on resuming, a resume being this package's way of continuing a run
RESUME_WARNINGS = (
    # the data module saves and restores its own stream: a run resumed mid-epoch continues exactly
    (r"You're resuming from a checkpoint that ended before the epoch ended", UserWarning, r"lightning\."),
    # the resumed run saves into the checkpoint folder of the run it continues
    (r"Checkpoint directory .* exists and is not empty", UserWarning, r"lightning\."),
)
# Lightning's advertisement for its LitLogger, logged on every run without one
LITLOGGER_TIP = re.compile(r"\W*Tip: .*\blitlogger\b")
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
# Lightning's notes on the way out of a stopped run (SIGTERM, divergence), ahead of this package's one line
# saying what happened and what to do: the signal, and "An SIGTERMException was raised with message: ..."
STOP_NOTES = re.compile(r"(\[rank: \d+\] )?Received SIGTERM|An \w+ was raised with message")
SIGNAL_LOGGER = "lightning.pytorch.trainer.connectors.signal_connector"
# torch's note, when `torch.compile` builds CPU kernels with the CUDA build of torch, that there is no GPU
NO_CUDA_RUNTIME = re.compile(r"No CUDA runtime is found")
CPP_EXTENSION_LOGGER = "torch.utils.cpp_extension"


class _Dropping(logging.Filter):
    """A logger filter that drops the records whose message starts with a match of `pattern`."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


# one instance each: a logger takes a filter once, however often `quiet_known_warnings` runs
_DROP_LITLOGGER_TIP = _Dropping(LITLOGGER_TIP)
_DROP_NO_CUDA_RUNTIME = _Dropping(NO_CUDA_RUNTIME)
_DROP_STOP_NOTES = _Dropping(STOP_NOTES)


def quiet_known_warnings() -> None:
    """Ignore `KNOWN_WARNINGS` (unless warnings were asked for with `python -W` or `PYTHONWARNINGS`) and drop
    Lightning's LitLogger tip and notes on stopping, and torch's no-CUDA-runtime note."""
    _ignore(KNOWN_WARNINGS)
    for name in RANK_ZERO_LOGGERS:
        logging.getLogger(name).addFilter(_DROP_LITLOGGER_TIP)
        logging.getLogger(name).addFilter(_DROP_STOP_NOTES)
    logging.getLogger(SIGNAL_LOGGER).addFilter(_DROP_STOP_NOTES)
    logging.getLogger(CPP_EXTENSION_LOGGER).addFilter(_DROP_NO_CUDA_RUNTIME)


def quiet_resume_warnings() -> None:
    """Ignore `RESUME_WARNINGS` (unless warnings were asked for): for a run that resumes."""
    _ignore(RESUME_WARNINGS)


def _ignore(known: tuple[tuple[str, type[Warning], str], ...]) -> None:
    if not sys.warnoptions:
        for message, category, module in known:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
