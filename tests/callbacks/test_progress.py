"""LossProgressBar: the loss on the bar, read from the device only when the bar redraws."""

from __future__ import annotations

import functools
import logging
import sys

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from torch.utils.data import DataLoader

from ernievil2_train.callbacks.progress import LossProgressBar
from ernievil2_train.module import ErnieVil2Module
from tests.training_helpers import ALL_PAIRS, SyncWatch, make_batch, tiny_model


def _fit(refresh_rate: int, steps: int) -> tuple[LossProgressBar, SyncWatch]:
    batch = make_batch(8 * steps)
    samples = [{k: v[i] for k, v in batch.items()} for i in range(8 * steps)]
    bar, watch = LossProgressBar(refresh_rate=refresh_rate), SyncWatch()
    module = ErnieVil2Module(
        tiny_model(), loss={"weights": ALL_PAIRS},
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-4, fused=True),
    )
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_model_summary=False, callbacks=[bar, watch], log_every_n_steps=100,
    )
    trainer.fit(module, train_dataloaders=DataLoader(samples, batch_size=8, drop_last=True))
    return bar, watch


def test_loss_is_shown_and_read_once_per_redraw():
    bar, watch = _fit(refresh_rate=4, steps=9)
    shown = bar.train_progress_bar.postfix
    assert "loss=" in shown, shown
    assert float(shown.split("loss=")[1].split(",")[0]) > 0
    # steps 2..9 are watched: the bar redraws after steps 4, 8 and the last one, and at the epoch's end
    assert watch.batches == 8
    assert 2 <= watch.counter.ops["aten._local_scalar_dense"] <= 4, watch.counter.ops
    assert set(watch.counter.ops) == {"aten._local_scalar_dense"}


def test_refreshing_every_step_reads_every_step():
    """Control: the count above comes from the redraws."""
    _, watch = _fit(refresh_rate=1, steps=9)
    assert watch.counter.ops["aten._local_scalar_dense"] >= 8, watch.counter.ops


class LogsAtEpochEnd(pl.Callback):
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logging.getLogger("tests.progress").warning("a log line")


def test_console_log_lines_get_a_line_of_their_own(capsys):
    """Not appended to the bar's line; the console handler is back in place after training."""
    root, console = logging.getLogger(), logging.StreamHandler(sys.stdout)
    root.addHandler(console)
    try:
        trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, accelerator="cpu",
                             logger=False, enable_checkpointing=False, enable_model_summary=False,
                             callbacks=[LogsAtEpochEnd(), LossProgressBar()])
        trainer.fit(BoringModel())
        assert console in root.handlers
    finally:
        root.removeHandler(console)
    out = capsys.readouterr().out
    assert out.count("a log line") == 1
    assert out[out.index("a log line") - 1] in "\r\n", out


class FailsAtSecondStep(BoringModel):
    def training_step(self, batch, batch_idx):
        if batch_idx == 1:
            raise RuntimeError("stopped")
        return super().training_step(batch, batch_idx)


def test_an_error_in_training_leaves_the_bar_on_a_line_of_its_own(capsys):
    """The one-line error printed after it starts on a new line, not at the end of the bar."""
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=0, accelerator="cpu",
                         logger=False, enable_checkpointing=False, enable_model_summary=False,
                         callbacks=[LossProgressBar()])
    with pytest.raises(RuntimeError, match="stopped"):
        trainer.fit(FailsAtSecondStep())
    out = capsys.readouterr().out
    assert "Epoch 0" in out and out.endswith("\n"), repr(out[-200:])
