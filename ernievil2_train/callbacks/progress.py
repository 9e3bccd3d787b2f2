"""The training progress bar: shows the loss without reading it back from the device in every step."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar


class LossProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar plus the latest `train/loss`, read only when the bar redraws.

    A metric logged with `prog_bar=True` is turned into a Python number after every batch, which makes the
    host wait for the GPU each step; this bar reads the loss every `refresh_rate` steps instead.
    """

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            metrics["loss"] = f"{float(loss):.4g}"
        return metrics
