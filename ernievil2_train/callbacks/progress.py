"""The training progress bar: shows the loss without reading it back from the device in every step, and keeps
console log lines off its bars."""

from __future__ import annotations

import logging
import sys
from contextlib import ExitStack, suppress
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from tqdm.contrib.logging import logging_redirect_tqdm

# The loggers conf/hydra/default.yaml gives a console handler: the root and Lightning's.
CONSOLE_LOGGERS = ("", "lightning.pytorch", "lightning.fabric")


def console_loggers() -> list[logging.Logger]:
    """Those of `CONSOLE_LOGGERS` with a handler writing to stdout or stderr."""
    consoles = (sys.stdout, sys.stderr)
    loggers = [logging.getLogger(name) for name in CONSOLE_LOGGERS]
    return [lg for lg in loggers if any(getattr(h, "stream", None) in consoles for h in lg.handlers)]


class LossProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar plus the latest `train/loss`, read only when the bar redraws.

    A metric logged with `prog_bar=True` is turned into a Python number after every batch, which makes the
    host wait for the GPU each step; this bar reads the loss every `refresh_rate` steps instead.
    While it trains, the console handlers of `CONSOLE_LOGGERS` write through `tqdm.write`: a log line gets a
    line of its own above the bars instead of being appended to the bar's line.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._redirect = ExitStack()

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            metrics["loss"] = f"{float(loss):.4g}"
        return metrics

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.is_enabled:
            self._redirect.enter_context(logging_redirect_tqdm(console_loggers()))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._redirect.close()
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, error: BaseException) -> None:
        """Close the training bar: the one-line error that follows gets a line of its own."""
        self._redirect.close()
        with suppress(TypeError):  # no bar yet
            self.train_progress_bar.close()
        super().on_exception(trainer, pl_module, error)
