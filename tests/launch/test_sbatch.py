"""The sbatch template, rendered in a fake SLURM environment with a recording `srun`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import REPO_ROOT

SBATCH = REPO_ROOT / "launch" / "train.sbatch"


def _fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$FAKE_SRUN_LOG"\n')
    srun.chmod(0o755)
    return bin_dir


def _render(tmp_path: Path, extra_env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {
        "PATH": f"{_fake_bin(tmp_path)}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "FAKE_SRUN_LOG": str(tmp_path / "srun.args"),
        **extra_env,
    }
    return subprocess.run(
        ["bash", str(SBATCH), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )


def test_sbatch_renders_the_ddp_command(tmp_path: Path) -> None:
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "ernievil2",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS_PER_NODE": "8",
        "SLURM_CPUS_PER_TASK": "12",
        "SLURM_RESTART_COUNT": "1",
    }
    result = _render(tmp_path, slurm, "+experiment=pretrain_multiview", "data.train_shards='/d/{0..9}.tar'")
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert args[:5] == ["--kill-on-bad-exit=1", "--cpus-per-task=12", "python", "-m", "ernievil2_train"]
    assert "trainer=ddp" in args
    assert "trainer.num_nodes=2" in args
    assert "trainer.devices=8" in args
    assert "hydra.run.dir=outputs/slurm/ernievil2-4242" in args
    assert args[-2:] == ["+experiment=pretrain_multiview", "data.train_shards='/d/{0..9}.tar'"]
    assert "restart 1" in result.stdout


def test_sbatch_refuses_gpus_without_a_task_for_each(tmp_path: Path) -> None:
    """Without --ntasks-per-node srun starts one task per node, and Lightning, told trainer.devices=4, would
    train with that one process on one GPU: refused, naming the setting. One GPU needs no more."""
    slurm = {"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "j", "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "4"}
    result = _render(tmp_path, slurm)
    assert result.returncode == 2 and not (tmp_path / "srun.args").exists()
    assert result.stderr.strip() == (
        "error: set #SBATCH --ntasks-per-node=4 (one task per GPU) beside --gpus-per-node"
    )
    one = tmp_path / "one"
    one.mkdir()
    assert _render(one, {**slurm, "SLURM_GPUS_ON_NODE": "1"}).returncode == 0
    assert "trainer.devices=1" in (one / "srun.args").read_text().splitlines()


def test_sbatch_header_requests_requeue_and_the_pre_timeout_signal() -> None:
    header = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in header
    assert any(line.startswith("#SBATCH --signal=SIGUSR1@") for line in header)


def test_sbatch_refuses_to_run_outside_slurm(tmp_path: Path) -> None:
    result = _render(tmp_path, {"SLURM_NNODES": "1"})
    assert result.returncode != 0
    assert "SLURM_JOB_ID" in result.stderr
    assert not (tmp_path / "srun.args").exists()
