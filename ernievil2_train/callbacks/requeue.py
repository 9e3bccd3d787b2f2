"""SLURM pre-timeout requeue that saves at a step boundary.

Lightning's own SLURM handler saves its checkpoint *inside* the signal handler, i.e. at whatever point of the
step the signal lands: between two optimizer param groups, the saved state can hold some groups already
stepped and others not, and the resumed run carries that skew forever. This callback only sets a flag in the
handler; at the next step boundary (agreed across ranks) it saves `hpc_ckpt_<n>.ckpt` into the run folder,
asks SLURM to requeue the job and ends the process. The restarted job finds the checkpoint and resumes.

It ends the run with `RequeueExit` (exit status 0) rather than `trainer.should_stop`: a stop request makes
Lightning close the interrupted epoch as if it were complete, so its epoch-end hooks would evaluate a partial
epoch and save `last.ckpt` as an epoch-end checkpoint, newer than `hpc_ckpt_<n>.ckpt`, from which a resumed
run starts the next epoch and never trains the rest of this one. The exception takes Lightning's interruption
path instead, as SIGTERM does: `on_exception` hooks only (a `ModelCheckpoint` with `save_on_exception` saves
the same mid-epoch state).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info


class RequeueExit(SystemExit):
    """Ends a requeued job's process after its checkpoint is saved (exit status 0)."""

    def __init__(self) -> None:
        super().__init__(0)


class SlurmRequeue(pl.Callback):
    """On `signal_name` inside a SLURM job: save at the next step boundary, `scontrol requeue`, exit.

    With several ranks the signal is checked every `check_every_n_steps` steps (all ranks agree on it with a
    collective); a single process checks its flag after every step at no cost."""

    def __init__(self, signal_name: str = "SIGUSR1", check_every_n_steps: int = 1) -> None:
        if signal_name not in signal.Signals.__members__:
            raise ValueError(f"signal_name: {signal_name!r} is not a signal name (SLURM's is SIGUSR1)")
        self.signum = signal.Signals[signal_name]
        every = check_every_n_steps
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"check_every_n_steps must be 1 or more, got {every!r}")
        self.check_every_n_steps = every
        self.requested = False
        self._previous: Any = None

    @staticmethod
    def job_id() -> str | None:
        """The id `scontrol requeue` takes (array jobs: `<array job>_<task>`), or None outside SLURM."""
        array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
        if array_job is not None:
            return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        return os.environ.get("SLURM_JOB_ID")

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Installed before the Trainer registers its handlers, so Lightning's in-handler save stays off.
        if stage == "fit" and self.job_id() is not None:
            self._previous = signal.signal(self.signum, self._handle)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._previous is None:
            return
        if trainer.world_size == 1:
            if not self.requested:
                return
        # ranks agree on the decision with a collective (and a host sync): only every n steps
        elif trainer.global_step % self.check_every_n_steps or not trainer.strategy.reduce_boolean_decision(
            self.requested, all=False
        ):
            return
        # one name for every rank (a sharded checkpoint is a folder all ranks write into)
        index = trainer.strategy.broadcast(self._next_index(trainer), src=0)
        path = Path(trainer.default_root_dir) / f"hpc_ckpt_{index}.ckpt"
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            job = self.job_id()
            code = subprocess.call(["scontrol", "requeue", str(job)])
            rank_zero_info(f"saved {path} at step {trainer.global_step}; scontrol requeue {job}: exit {code}")
        self.requested = False
        _log_the_step(trainer)
        raise RequeueExit()

    @staticmethod
    def _next_index(trainer: pl.Trainer) -> int:
        existing = [p.stem.rsplit("_", 1)[-1] for p in Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt")]
        return 1 + max((int(i) for i in existing if i.isdigit()), default=0)


def _log_the_step(trainer: pl.Trainer) -> None:
    """Hand the step's logged values (losses, accuracies, temperatures) to the loggers, as Lightning does
    right after the batch-end hooks, which the exit skips: the resumed run's logs then have every step."""
    connector = trainer._logger_connector
    connector.on_batch_end()
    connector.update_train_step_metrics()
