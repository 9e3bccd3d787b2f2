"""FSDP sharding of the training module (2 gloo processes on CPU; Lightning runs FSDP on GPUs only)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tests.ddp_helpers import run_ranks
from tests.fsdp_worker import worker

WORLD = 2


def test_the_module_shards_and_trains_its_temperatures_under_fsdp(tmp_path: Path) -> None:
    """FSDP refuses 0-dim parameters, so every temperature must be a 1-element tensor; one step then updates
    them identically on every rank."""
    run_ranks(worker, WORLD, (str(tmp_path),), timeout_s=180)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert all(math.isfinite(rank["loss"]) for rank in ranks)
    assert ranks[0]["after"] == ranks[1]["after"]
    assert len(ranks[0]["after"]) == 4  # the model's logit_scale and the loss's three per-pair scales
    assert all(a != b for a, b in zip(ranks[0]["after"], ranks[0]["before"], strict=True))
