"""SlurmRequeue: the saved state resumes mid-epoch, and no epoch-end work runs on the interrupted epoch."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from ernievil2_train.callbacks import requeue
from ernievil2_train.callbacks.requeue import SlurmRequeue
from ernievil2_train.resume import resume_checkpoint

BATCHES = 10
SIGNAL_AT = 3  # the signal arrives during batch 3 of epoch 0


class Recorder(pl.LightningModule):
    """One weight; records every (epoch, batch) it trains on and the epochs whose end hooks ran."""

    def __init__(self, signal_at: int | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.signal_at = signal_at
        self.trained: list[tuple[int, int]] = []
        self.epoch_ends: list[int] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.trained.append((self.current_epoch, batch_idx))
        self.log("batch", batch.float().mean())
        if self.current_epoch == 0 and batch_idx == self.signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        return (self.weight - batch.float().mean()).pow(2).sum()

    def on_train_epoch_end(self) -> None:
        self.epoch_ends.append(self.current_epoch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.weight], lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.arange(BATCHES), batch_size=1)


def _trainer(run_dir: Path, *callbacks: pl.Callback) -> pl.Trainer:
    last = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", enable_version_counter=False,
                           save_on_train_epoch_end=True, save_on_exception=True)
    logger = CSVLogger(run_dir, name="csv", version=str(len(list(run_dir.glob("csv/*")))))
    return pl.Trainer(default_root_dir=run_dir, max_epochs=2, accelerator="cpu", logger=logger,
                      log_every_n_steps=1, callbacks=[*callbacks, last], enable_progress_bar=False,
                      enable_model_summary=False)


def _logged_steps(run_dir: Path) -> list[int]:
    """The steps of the `batch` values in the run's CSV logs, every run of it (each has a version)."""
    steps = []
    for path in sorted(run_dir.glob("csv/*/metrics.csv")):
        with path.open() as rows:
            steps += [int(row["step"]) for row in csv.DictReader(rows) if row.get("batch")]
    return steps


def test_requeue_exits_at_the_step_and_the_run_resumes_mid_epoch(tmp_path, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(requeue.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    run_dir = tmp_path / "run"
    interrupted = Recorder(signal_at=SIGNAL_AT)
    previous = signal.getsignal(signal.SIGUSR1)
    exit_code: int | str | None = "no exit"
    try:
        _trainer(run_dir, SlurmRequeue()).fit(interrupted)
    except SystemExit as exit_:
        exit_code = exit_.code
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert calls == [["scontrol", "requeue", "4242"]]
    assert interrupted.trained == [(0, i) for i in range(SIGNAL_AT + 1)]
    assert interrupted.epoch_ends == []  # the interrupted epoch is not closed as if it were complete
    assert [p.name for p in run_dir.glob("hpc_ckpt_*.ckpt")] == ["hpc_ckpt_1.ckpt"]
    assert _logged_steps(run_dir) == list(range(SIGNAL_AT + 1))  # the step it stopped at is logged too

    monkeypatch.delenv("SLURM_JOB_ID")
    resumed = Recorder()
    _trainer(run_dir).fit(resumed, ckpt_path=resume_checkpoint(None, run_dir))
    expected = [(0, i) for i in range(SIGNAL_AT + 1, BATCHES)] + [(1, i) for i in range(BATCHES)]
    assert resumed.trained == expected  # every batch of the interrupted epoch is trained, once
    assert _logged_steps(run_dir) == list(range(2 * BATCHES))
    assert exit_code == 0  # the requeued job's process ends without an error status


def test_outside_slurm_the_signal_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    callback = SlurmRequeue()
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        module = Recorder()
        _trainer(tmp_path / "run", callback).fit(module)
        assert len(module.trained) == 2 * BATCHES and not list((tmp_path / "run").glob("hpc_ckpt_*"))
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_name_that_is_no_signal_is_refused():
    with pytest.raises(ValueError, match=r"signal_name: 'SIGFOO' is not a signal name"):
        SlurmRequeue(signal_name="SIGFOO")
    assert SlurmRequeue(signal_name="SIGUSR2").signum == signal.SIGUSR2
    for every in (0, -3, 1.5, True):  # 0 and -3 were taken as 1
        with pytest.raises(ValueError, match=rf"^check_every_n_steps must be 1 or more, got {every!r}$"):
            SlurmRequeue(check_every_n_steps=every)
