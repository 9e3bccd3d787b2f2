"""Loggers that continue a resumed run: W&B offline without an account under the same run id, and a CSV
file that keeps the rows an earlier run of the same folder wrote."""

from __future__ import annotations

import csv
import netrc
import os
import uuid
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from ernievil2_train.distributed import is_first_process

RUN_ID_FILE = "wandb_run_id.txt"
def wandb_has_credentials() -> bool:
    """True when an API key is configured (environment variable or `wandb login`'s netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        entries = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in entries)


def wandb_logger(
    project: str,
    save_dir: str,
    name: str | None = None,
    offline: bool | None = None,
    tags: list[str] | None = None,
    log_model: bool = False,
    **kwargs: Any,
) -> WandbLogger:
    """A `WandbLogger` whose run id is kept in `save_dir`, so a resumed run logs into the same W&B run.

    `offline=None` means: offline unless credentials are configured (or `WANDB_MODE` says otherwise);
    `offline=False` without credentials is a ValueError (W&B would refuse at its first log).
    """
    mode = os.environ.get("WANDB_MODE")
    if offline is None:
        offline = mode in ("offline", "dryrun") if mode else not wandb_has_credentials()
    elif not offline and mode not in ("offline", "dryrun", "disabled") and not wandb_has_credentials():
        raise ValueError("offline=false needs a W&B login (`wandb login`, or WANDB_API_KEY); without one, "
                         "leave it null (offline)")
    id_file = Path(save_dir) / RUN_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        if is_first_process():  # other ranks log nothing; a write of theirs would replace rank 0's id
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id)
    logger = WandbLogger(
        project=project,
        name=name,
        save_dir=save_dir,
        offline=offline,
        tags=list(tags or []),
        log_model=log_model,
        id=run_id,
        resume="allow",
        **kwargs,
    )
    # Lightning passes `anonymous=None` to `wandb.init`, which W&B answers with a deprecation warning for a
    # setting nobody set; the keyword is left out unless it was given.
    init_arguments = getattr(logger, "_wandb_init", {})
    if init_arguments.get("anonymous", "given") is None:
        del init_arguments["anonymous"]
    return logger


class ResumableExperimentWriter(ExperimentWriter):
    """An `ExperimentWriter` that appends to an existing metrics.csv instead of deleting it.

    The existing header seeds the known columns, so Lightning's rewrite on new columns unions the headers.
    The first step logged here is where this run starts: rows of the earlier run from that step on were
    logged after the checkpoint it resumed from, and are dropped so the file reads like one run.
    """

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir=log_dir)
        self._start_step: int | None = None
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])

    def _check_log_dir_exists(self) -> None:
        """Keep what an earlier run of this folder wrote."""

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        """Record metrics; the first call drops the earlier run's rows from its step on."""
        if step is None:
            step = len(self.metrics)
        if self._start_step is None:
            self._start_step = step
            self._drop_rows_from(step)
        super().log_metrics(metrics_dict, step)

    def _drop_rows_from(self, step: int) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            rows = list(csv.DictReader(file))
        kept = [row for row in rows if not row.get("step", "").isdigit() or int(row["step"]) < step]
        if len(kept) < len(rows):
            partial = f"{self.metrics_file_path}.tmp"
            with self._fs.open(partial, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
            self._fs.mv(partial, self.metrics_file_path)


class ResumableCSVLogger(CSVLogger):
    """A `CSVLogger` whose metrics.csv survives a resume into the same folder."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ResumableExperimentWriter:
        """The writer, made on first use."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ResumableExperimentWriter(log_dir=self.log_dir)
        return self._experiment
