"""CPU smoke run of the training-step benchmark: both systems time a tiny step and report every field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SYSTEM_FIELDS = {
    "batch_size",
    "step_ms",
    "samples_per_s",
    "flops_per_step",
    "gflops_per_sample",
    "tflops",
    "mfu",
    "peak_memory_bytes",
    "memory_per_sample_bytes",
    "encoder_passes",
    "params",
    "loss",
    "host_syncs_per_step",
}


def test_tiny_run_reports_both_systems(tmp_path: Path) -> None:
    out = tmp_path / "train_step.json"
    cmd = [sys.executable, "bench/train_step.py", "--tiny", "--device", "cpu", "--steps", "2"]
    cmd += ["--warmup", "1"]
    proc = subprocess.run(
        [*cmd, "--json", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())

    assert set(report["systems"]) == {"ernievil2", "openclip"}
    for name, system in report["systems"].items():
        assert set(system) >= SYSTEM_FIELDS, f"{name} lacks {SYSTEM_FIELDS - set(system)}"
        assert system["samples_per_s"] > 0 and system["step_ms"] > 0
        assert system["flops_per_step"] > 0 and system["tflops"] > 0
        assert system["mfu"] is None  # no measured ceiling on CPU
        assert system["batch_size"] == report["env"]["batch_size"]
    ours, peer = report["systems"]["ernievil2"], report["systems"]["openclip"]
    assert ours["host_syncs_per_step"] == {}  # the multi-view step never waits for the device
    assert ours["encoder_passes"] == 5 and peer["encoder_passes"] == 2
    # the multi-view step encodes more per sample than the single-view one
    assert ours["gflops_per_sample"] > peer["gflops_per_sample"]
    ratios = report["ratios"]
    assert ratios["samples_per_s"] == ours["samples_per_s"] / peer["samples_per_s"]
    assert ratios["encoder_passes"] == 2.5
    assert ratios["tflops"] == ours["tflops"] / peer["tflops"] and ratios["mfu"] is None
    assert report["env"]["tiny"] is True and report["env"]["amp"] == "fp32"
    assert report["ceiling_tflops"] is None
    for name in report["systems"]:
        assert name in proc.stdout  # the table is printed too
    assert "ours/OpenCLIP: MFU xn/a | TFLOP/s x" in proc.stdout


def test_bad_batch_size_is_a_usage_error() -> None:
    proc = subprocess.run(
        [sys.executable, "bench/train_step.py", "--device", "cpu", "--batch-size", "0"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "--batch-size must be >= 1" in proc.stderr
