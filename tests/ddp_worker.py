"""Rank body of the 2-process gloo tests (spawned processes import it, so it is not in the test file)."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import prepare_for_backward
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ernievil2_train import distributed
from ernievil2_train.module import ErnieVil2Module
from tests.training_helpers import ALL_PAIRS, make_batch, tiny_model

GLOBAL_BATCH = 8
LOG_SCALE = 4.0  # sharp softmax: gradients well above the comparison tolerance
CASES = {
    **{pair: {pair: 1.0} for pair in ALL_PAIRS},
    "weighted_sum": ALL_PAIRS,
}
# variant -> the cases it runs (kept small: every spawned process pays the imports and each case a DDP set-up)
VARIANTS = {
    "autograd_gather": list(CASES),
    "feature_cache": ["weighted_sum"],
    "no_grad_gather": ["image_caption", "text_text", "weighted_sum"],
}


def build_module(weights: dict[str, float], microbatches: int = 1) -> ErnieVil2Module:
    """The module under test: tiny float64 DualEncoder, per-pair temperatures, multi-positive targets."""
    loss = {"weights": weights, "multi_positive": True, "temperature": "per_pair"}
    loss["temperature_init"] = LOG_SCALE
    model = tiny_model(seed=0, dtype=torch.float64)
    with torch.no_grad():
        model.logit_scale.fill_(LOG_SCALE)
    return ErnieVil2Module(model, loss=loss, accumulate_microbatches=microbatches).double()


def global_batch() -> dict[str, torch.Tensor]:
    return make_batch(GLOBAL_BATCH, seed=1, dtype=torch.float64)


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _no_grad_gather(x: torch.Tensor) -> torch.Tensor:
    """The known bug, for the negative control only: other ranks' rows gathered WITHOUT gradient."""
    rank, world_size = distributed.world()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts)


class _FeatureCacheStep(nn.Module):
    """DDP wrapper body for feature-cache accumulation, backward as Lightning's `manual_backward` does it."""

    def __init__(self, module: ErnieVil2Module) -> None:
        super().__init__()
        self.module = module
        self.ddp: DistributedDataParallel | None = None

    def _backward(self, tensor: torch.Tensor) -> None:
        prepare_for_backward(self.ddp, tensor)
        tensor.backward()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.module.feature_cache_losses(batch, self._backward, self.ddp.no_sync)


def run_case(weights: dict[str, float], local: dict[str, torch.Tensor], variant: str) -> dict:
    if variant == "feature_cache":
        module = build_module(weights, microbatches=2)
        step = _FeatureCacheStep(module)
        step.ddp = DistributedDataParallel(step)
        step.ddp(local)
        return grads(module)
    module = build_module(weights)
    ddp = DistributedDataParallel(module)
    ddp(local)["loss"].backward()
    return grads(module)


def batch_size_checks(local: dict[str, torch.Tensor]) -> dict:
    """All-gathers in a first and a second step (the size check communicates once), and the error when the
    local batch size changes (raised on every rank before any collective, so nothing hangs)."""
    module = build_module({"image_caption": 1.0})
    original = dist.all_gather
    calls: list[int] = []

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_gather = counting
    try:
        counts = []
        for _ in range(2):
            before = len(calls)
            module(local)
            counts.append(len(calls) - before)
        try:
            module({k: v[:-1] for k, v in local.items()})
            error = ""
        except RuntimeError as exn:
            error = str(exn)
    finally:
        dist.all_gather = original
    return {"gathers": counts, "error": error}


def worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Every variant x case; saves {variant: {case: {param name: DDP-averaged grad}}} to rank{rank}.pt."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    correct_gather = distributed.all_gather_with_grad
    try:
        size = GLOBAL_BATCH // world_size
        local = {k: v[rank * size : (rank + 1) * size] for k, v in global_batch().items()}
        results = {}
        for variant, cases in VARIANTS.items():
            buggy = variant == "no_grad_gather"
            distributed.all_gather_with_grad = _no_grad_gather if buggy else correct_gather
            results[variant] = {case: run_case(CASES[case], local, variant) for case in cases}
        distributed.all_gather_with_grad = correct_gather
        results["batch_size_checks"] = batch_size_checks(local)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        distributed.all_gather_with_grad = correct_gather
        dist.destroy_process_group()
