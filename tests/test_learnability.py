"""A tiny model trained briefly on the demo data retrieves clearly above chance, and every loss term falls."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from ernievil2_train.data.evalset import load_evalset

LOSSES = ("image_caption", "image_tags", "image_image", "text_text")


def _chance_mean_recall(num_texts: int, num_images: int) -> float:
    """Mean of R@1/5/10 (T2I and I2T) that random scores reach with one positive per query."""
    t2i = sum(min(k, num_images) / num_images for k in (1, 5, 10)) / 3
    i2t = sum(min(k, num_texts) / num_texts for k in (1, 5, 10)) / 3
    return (t2i + i2t) / 2


def test_demo_training_learns(demo_cache: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_"))}
    env.update(ERNIEVIL2_CACHE=str(demo_cache), OMP_NUM_THREADS="2")
    cmd = [
        sys.executable, "-m", "ernievil2_train", f"hydra.run.dir={run_dir}", "logger=csv",
        "data.image_size=32", "data.datamodule.batch_size=32", "data.datamodule.num_workers=1",
        "data.datamodule.epoch_samples=1024", "model.config.vision.width=64", "model.config.vision.layers=1",
        "model.config.text.width=64", "model.config.text.layers=1", "model.config.text.intermediate_size=128",
        "module.optimizer.lr=3e-3", "trainer.max_epochs=3", "trainer.log_every_n_steps=1",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "callbacks.retrieval.progress=false",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    recall = [float(r["retrieval/mean_recall"]) for r in rows if r.get("retrieval/mean_recall")]
    demo_root = next(p for p in (demo_cache / "demo").iterdir() if p.is_dir() and not p.name.startswith("."))
    evalset = load_evalset(demo_root / "eval", split="valid")
    chance = _chance_mean_recall(len(evalset.texts), len(evalset.images))
    assert len(recall) == 4, recall
    assert recall[-1] > 2 * chance, (recall, chance)
    assert recall[-1] > 1.5 * recall[0], recall

    steps = [r for r in rows if r.get("train/loss")]
    for name in LOSSES:
        values = [float(r[f"train/loss_{name}"]) for r in steps]
        first, last = sum(values[:10]) / 10, sum(values[-10:]) / 10
        assert last < first, (name, first, last)
