"""Compute threads of a CPU training process: the cores its loader workers leave, the user's count kept."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch

from ernievil2_train.cpu_threads import available_cores, cores_shared


def _trainer(devices: int = 1) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=devices, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False)


@pytest.mark.parametrize(("workers", "devices"), [(0, 1), (1, 1), (64, 1), (0, 2)])
def test_a_cpu_trainer_computes_with_the_cores_its_workers_leave(monkeypatch, workers, devices):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    expected = max(1, available_cores() // devices - workers)
    with cores_shared(_trainer(devices), workers) as threads:
        assert threads == expected == torch.get_num_threads()
        assert os.environ.get("OMP_NUM_THREADS") == (str(expected) if devices > 1 else None)
    assert torch.get_num_threads() == before and "OMP_NUM_THREADS" not in os.environ


def test_the_users_thread_count_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    before = torch.get_num_threads()
    with cores_shared(_trainer(), 1) as threads:
        assert threads is None and torch.get_num_threads() == before
    assert os.environ["OMP_NUM_THREADS"] == "3"
