"""CUDA checks, run on a GPU machine with `pytest -m gpu` (deselected by default: CI has no GPU)."""

from __future__ import annotations

import csv
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ernievil2_train import load_pretrained
from ernievil2_train.data.batches import trim_text_ids
from ernievil2_train.module import ErnieVil2Module
from tests.training_helpers import ALL_PAIRS, make_batch, tiny_model

pytestmark = pytest.mark.gpu


def test_bf16_training_step_on_cuda_matches_fp32() -> None:
    torch.manual_seed(0)
    module = ErnieVil2Module(tiny_model(), loss={"weights": ALL_PAIRS, "multi_positive": True}).cuda()
    batch = {k: v.cuda() for k, v in make_batch().items()}
    module.eval()
    with torch.no_grad():
        full = module(batch)["loss"]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = module(batch)["loss"]
    assert torch.isfinite(half)
    torch.testing.assert_close(half.float(), full, atol=5e-2, rtol=5e-2)


def test_training_step_never_waits_for_the_gpu() -> None:
    """CUDA's own sync check (raises on any sync) over bf16 forward, four losses, backward, fused AdamW."""
    module = ErnieVil2Module(tiny_model(), loss={"weights": ALL_PAIRS, "multi_positive": True}).cuda()
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-4, fused=True)(module.param_groups())
    batch = {k: v.cuda() for k, v in trim_text_ids(make_batch()).items()}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module.training_step(batch, 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        module.clamp_temperatures()

    step()  # first-step set-up (batch check, optimizer state)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_demo_training_runs_on_the_gpu(demo_cache: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_"))}
    env["ERNIEVIL2_CACHE"] = str(demo_cache)
    cmd = [sys.executable, "-m", "ernievil2_train", "trainer=gpu", "logger=csv", "trainer.max_epochs=2",
           "trainer.enable_progress_bar=false", "callbacks.retrieval.progress=false",
           f"hydra.run.dir={run_dir}"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("retrieval/mean_recall")]
    recall = [float(r["retrieval/mean_recall"]) for r in rows]
    assert len(recall) == 3
    assert recall[-1] > recall[0]
    assert (run_dir / "export" / "model.safetensors").is_file()


def test_fsdp_run_evaluates_and_exports(demo_cache: Path, tmp_path: Path) -> None:
    """FSDP on one GPU: retrieval and export go through the FSDP wrapper (its parameters are sharded)."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_"))}
    env["ERNIEVIL2_CACHE"] = str(demo_cache)
    cmd = [sys.executable, "-m", "ernievil2_train", "trainer=fsdp", "trainer.devices=1", "logger=csv",
           "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "callbacks.retrieval.progress=false",
           f"hydra.run.dir={run_dir}"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("retrieval/mean_recall")]
    assert len(rows) == 2
    exported = load_pretrained(run_dir / "export")
    assert all(torch.isfinite(p).all() for p in exported.parameters())
    assert (run_dir / "checkpoints" / "last.ckpt").exists()  # a folder: sharded state


EXPERIMENT_ON_DEMO = {
    "finetune_cococn": [],
    "pretrain_multiview": ["trainer.devices=1", "data.datamodule.num_workers=2",
                           "data.datamodule.resampled=false", "data.datamodule.epoch_samples=1024",
                           "data.datamodule.batch_size=64", "module.scheduler.warmup_steps=2"],
}


@pytest.mark.parametrize("experiment", sorted(EXPERIMENT_ON_DEMO))
def test_experiment_gpu_settings_train_the_demo(experiment: str, demo_cache: Path, tmp_path: Path) -> None:
    """The experiments' own GPU settings (compiled towers, fused AdamW, bf16-mixed, clipping; DDP for
    pretraining) through one epoch of the demo data and model."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_"))}
    env["ERNIEVIL2_CACHE"] = str(demo_cache)
    cmd = [sys.executable, "-m", "ernievil2_train", f"+experiment={experiment}", "data=demo", "model=demo",
           "logger=csv", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
           "callbacks.retrieval.progress=false", f"hydra.run.dir={run_dir}", *EXPERIMENT_ON_DEMO[experiment]]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("retrieval/mean_recall")]
    assert len(rows) == 2
    assert all(0.0 <= float(r["retrieval/mean_recall"]) <= 100.0 for r in rows)
    assert (run_dir / "export" / "model.safetensors").is_file()
