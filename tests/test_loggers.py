"""`wandb_logger`: only the first process writes the run id that a resumed run reads back.
`ResumableCSVLogger`: a resumed run's metrics.csv keeps the rows the earlier run wrote."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ernievil2_train.loggers import RUN_ID_FILE, ResumableCSVLogger, wandb_logger
from tests.app.test_cli import _cli, _env, _metric_rows, _run

LAUNCHER_RANKS = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID")


@pytest.fixture
def single_process(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in LAUNCHER_RANKS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return monkeypatch


def test_the_run_id_is_written_once_and_read_back(tmp_path, single_process):
    first = wandb_logger(project="p", save_dir=str(tmp_path))
    written = (tmp_path / RUN_ID_FILE).read_text()
    assert first.version == written
    assert wandb_logger(project="p", save_dir=str(tmp_path)).version == written


def test_an_online_run_without_a_login_is_refused_before_training(tmp_path, single_process):
    """W&B refused it with a traceback at the first log, once the run folder and data were set up."""
    single_process.delenv("WANDB_MODE")
    single_process.delenv("WANDB_API_KEY", raising=False)
    single_process.setenv("HOME", str(tmp_path))  # no netrc: no `wandb login`
    with pytest.raises(ValueError, match=r"^offline=false needs a W&B login \(`wandb login`, or WANDB_API"):
        wandb_logger(project="p", save_dir=str(tmp_path), offline=False)
    single_process.setenv("WANDB_MODE", "offline")  # the environment's choice stands
    assert wandb_logger(project="p", save_dir=str(tmp_path), offline=False) is not None


_OFFLINE_RUN = """
import sys
from ernievil2_train.loggers import wandb_logger
logger = wandb_logger(project="p", save_dir=sys.argv[1])
logger.experiment.log({"loss": 1.0})
logger.experiment.finish()
"""


def test_an_offline_run_starts_without_a_warning_about_settings_not_set(tmp_path, single_process):
    """In a process of its own: W&B prints each note once per process."""
    single_process.delenv("WANDB_SILENT", raising=False)
    run = subprocess.run([sys.executable, "-c", _OFFLINE_RUN, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "offline" in run.stderr  # W&B's own notes do print
    assert "WARNING" not in run.stderr, run.stderr


@pytest.mark.parametrize("variables", [
    {"SLURM_PROCID": "3"}, {"LOCAL_RANK": "1"}, {"RANK": "5", "LOCAL_RANK": "0"},
    {"SLURM_PROCID": "8", "SLURM_LOCALID": "0"},
])
def test_other_ranks_never_write_the_run_id(tmp_path, single_process, variables):
    """srun starts every task at once with only SLURM_* set: a task of another node or GPU must not replace
    the id rank 0 logs under (the requeued job would resume another W&B run)."""
    for name, value in variables.items():
        single_process.setenv(name, value)
    wandb_logger(project="p", save_dir=str(tmp_path))
    assert not (tmp_path / RUN_ID_FILE).exists()


def test_rank_zero_of_srun_writes_the_run_id(tmp_path, single_process):
    single_process.setenv("SLURM_PROCID", "0")
    logger = wandb_logger(project="p", save_dir=str(tmp_path))
    assert (tmp_path / RUN_ID_FILE).read_text() == logger.version


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _csv_logger(root: Path, hparams: dict[str, float], rows: list[tuple[int, dict[str, float]]]) -> None:
    """One run's logging into `root/csv`, as the training CLI configures it."""
    logger = ResumableCSVLogger(root, name="csv", version="")
    logger.log_hyperparams(hparams)
    for step, metrics in rows:
        logger.log_metrics(metrics, step=step)
    logger.finalize("success")


def test_a_resumed_csv_logger_keeps_earlier_rows_and_unions_the_header(tmp_path, recwarn):
    _csv_logger(tmp_path, {"lr": 0.1}, [(0, {"retrieval/mean_recall": 0.25}), (3, {"train/loss": 2.0})])
    _csv_logger(tmp_path, {"lr": 0.2}, [(4, {"train/loss": 1.5}), (7, {"val/loss": 1.25, "train/loss": 1.0})])
    header, rows = _read_csv(tmp_path / "csv" / "metrics.csv")
    assert header == ["retrieval/mean_recall", "step", "train/loss", "val/loss"]
    assert rows == [
        {"retrieval/mean_recall": "0.25", "step": "0", "train/loss": "", "val/loss": ""},
        {"retrieval/mean_recall": "", "step": "3", "train/loss": "2.0", "val/loss": ""},
        {"retrieval/mean_recall": "", "step": "4", "train/loss": "1.5", "val/loss": ""},
        {"retrieval/mean_recall": "", "step": "7", "train/loss": "1.0", "val/loss": "1.25"},
    ]
    assert not [w for w in recwarn if "deleted" in str(w.message)]
    assert yaml.safe_load((tmp_path / "csv" / "hparams.yaml").read_text()) == {"lr": 0.2}


def test_rows_logged_after_the_resumed_checkpoint_are_replaced(tmp_path):
    """The earlier run logged steps 4 and 5 after the checkpoint at step 4 that the next run resumes from."""
    _csv_logger(tmp_path, {}, [(0, {"train/loss": 3.0}), (3, {"train/loss": 2.0}), (4, {"train/loss": 1.8}),
                               (5, {"train/loss": 1.6})])
    _csv_logger(tmp_path, {}, [(4, {"train/loss": 1.5}), (5, {"train/loss": 1.25})])
    header, rows = _read_csv(tmp_path / "csv" / "metrics.csv")
    assert header == ["step", "train/loss"]
    assert [(row["step"], row["train/loss"]) for row in rows] == [
        ("0", "3.0"), ("3", "2.0"), ("4", "1.5"), ("5", "1.25")
    ]


def test_cli_resume_keeps_the_earlier_runs_csv_rows(demo_cache: Path, tmp_path: Path) -> None:
    """Epochs of 4 steps: recall rows at step 0 (zero-shot baseline), 3 and 7, however often epoch 2 runs."""
    run_dir, env = tmp_path / "run", _env(demo_cache)
    tiny = ["logger=csv", "data.datamodule.epoch_samples=64", "callbacks.retrieval.max_items=32"]
    first = _run(_cli(run_dir, *tiny, "trainer.max_epochs=1"), env)
    assert first.returncode == 0, first.stderr[-3000:]
    first_rows = _metric_rows(run_dir, "retrieval/mean_recall")
    assert [row["step"] for row in first_rows] == ["0", "3"]
    after_epoch_1 = shutil.copy(run_dir / "checkpoints" / "last.ckpt", tmp_path / "epoch1.ckpt")

    resumed = _run(_cli(run_dir, *tiny, "trainer.max_epochs=2"), env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    recalls = _metric_rows(run_dir, "retrieval/mean_recall")
    assert [row["step"] for row in recalls] == ["0", "3", "7"]
    assert recalls[:2] == first_rows
    assert "will be deleted" not in resumed.stderr

    again = _run(_cli(run_dir, *tiny, "trainer.max_epochs=2", f"ckpt_path={after_epoch_1}"), env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [row["step"] for row in _metric_rows(run_dir, "retrieval/mean_recall")] == ["0", "3", "7"]
