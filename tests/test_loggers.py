"""`wandb_logger`: only the first process writes the run id that a resumed run reads back."""

from __future__ import annotations

import pytest

from ernievil2_train.loggers import RUN_ID_FILE, wandb_logger

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
