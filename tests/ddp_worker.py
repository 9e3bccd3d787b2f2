"""Rank body of the 2-process gloo tests (spawned processes import it, so it is not in the test file)."""

from __future__ import annotations

import os
import random
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import prepare_for_backward
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ernievil2_train import distributed
from ernievil2_train.module import ErnieVil2Module
from ernievil2_train.rng import own_rng_state, rng_states_of_ranks, set_rng_state
from tests.training_helpers import ALL_PAIRS, make_batch, tiny_model

Batch = dict[str, torch.Tensor]
GLOBAL_BATCH = 8
LOG_SCALE = 4.0  # sharp softmax: gradients well above the comparison tolerance
CASES = {
    **{pair: {pair: 1.0} for pair in ALL_PAIRS},
    "weighted_sum": ALL_PAIRS,
    "uneven_tags": ALL_PAIRS,  # on `global_batch("uneven_tags")`: rank 0 holds no tagged sample
    "hard_labels": ALL_PAIRS,  # one positive per row (multi_positive off): each rank's labels are offset
}
SINGLE_POSITIVE_CASES = {"hard_labels"}
# variant -> the cases it runs (kept small: every spawned process pays the imports and each case a DDP set-up)
VARIANTS = {
    "autograd_gather": list(CASES),
    "feature_cache": ["weighted_sum", "uneven_tags", "hard_labels"],
    "no_grad_gather": ["image_caption", "text_text", "weighted_sum"],
}


def build_module(
    weights: dict[str, float], microbatches: int = 1, multi_positive: bool = True
) -> ErnieVil2Module:
    """The module under test: tiny float64 DualEncoder, per-pair temperatures, multi-positive targets (or one
    positive per row)."""
    loss = {"weights": weights, "multi_positive": multi_positive, "temperature": "per_pair"}
    loss["temperature_init"] = LOG_SCALE
    model = tiny_model(seed=0, dtype=torch.float64)
    with torch.no_grad():
        model.logit_scale.fill_(LOG_SCALE)
    return ErnieVil2Module(model, loss=loss, accumulate_microbatches=microbatches).double()


def global_batch(case: str = "") -> dict[str, torch.Tensor]:
    """The global batch of a case. For "uneven_tags", rank 0's half has no tags and rank 1's has three (the
    duplicated image and caption keys of `make_batch` still span both halves)."""
    batch = make_batch(GLOBAL_BATCH, seed=1, dtype=torch.float64)
    if case == "uneven_tags":
        has_tags = torch.zeros(GLOBAL_BATCH, dtype=torch.bool)
        has_tags[GLOBAL_BATCH // 2 :] = True
        has_tags[-2] = False
        batch["has_tags"] = has_tags
        batch["tag_ids"] = torch.where(has_tags[:, None], batch["tag_ids"], 0)
    return batch


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


def logged_metrics(module: ErnieVil2Module, out: Batch, batch: Batch) -> dict[str, torch.Tensor]:
    """What the training step logs for `out`: {name: value}."""
    logged: dict[str, torch.Tensor] = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, value.detach().clone())
    module._log_train(out, batch)
    return logged


def case_module(case: str, microbatches: int = 1) -> ErnieVil2Module:
    """`build_module` with the weights and targets of a case."""
    return build_module(CASES[case], microbatches, multi_positive=case not in SINGLE_POSITIVE_CASES)


def run_case(case: str, local: dict[str, torch.Tensor], variant: str) -> dict:
    """{"grads": DDP-averaged parameter gradients, "out": this rank's loss dict, "logged": logged metrics}."""
    if variant == "feature_cache":
        module = case_module(case, microbatches=2)
        step = _FeatureCacheStep(module)
        step.ddp = DistributedDataParallel(step)
        out = step.ddp(local)
    else:
        module = case_module(case)
        ddp = DistributedDataParallel(module)
        out = ddp(local)
        out["loss"].backward()
    out = {k: v.detach() for k, v in out.items()}
    return {"grads": grads(module), "out": out, "logged": logged_metrics(module, out, local)}


def gather_backward_keeps_shared_gradient() -> torch.Tensor:
    """The gradient of a tensor used beside a gathered one in a sum: autograd hands both the same gradient
    tensor, which the gather's backward must not change (the sum term is created first, so its backward
    runs after the gather's)."""
    _, world_size = distributed.world()
    x = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.zeros(2 * world_size, 3, dtype=torch.float64, requires_grad=True)
    beside = w * 1.0
    weights = torch.arange(6.0 * world_size, dtype=torch.float64).reshape(-1, 3)
    ((distributed.all_gather_with_grad(x) + beside) * weights).sum().backward()
    return w.grad


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


def rng_round_trip(rank: int, world_size: int) -> dict:
    """Ranks that drew different amounts save their generators' states together (`rng_states_of_ranks`),
    draw on, then each restores its own: it draws again what it drew right after the save."""
    torch.manual_seed(0)
    random.seed(0)
    torch.rand(rank + 1)  # as dropout over the batch of each rank's own text length
    random.random()
    saved = rng_states_of_ranks(torch.device("cpu"))
    after_save = (torch.rand(4), random.random())
    torch.rand(100)
    random.random()
    set_rng_state(own_rng_state(saved, rank, world_size), torch.device("cpu"))
    return {"saved": len(saved), "after_save": after_save, "after_restore": (torch.rand(4), random.random())}


def worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Every variant x case; saves {variant: {case: run_case(...)}} and the other checks to rank{rank}.pt."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    correct_gather = distributed.all_gather_with_grad
    try:
        size = GLOBAL_BATCH // world_size
        rows = slice(rank * size, (rank + 1) * size)
        local_batches = {case: {k: v[rows] for k, v in global_batch(case).items()} for case in CASES}
        results: dict = {}
        for variant, cases in VARIANTS.items():
            buggy = variant == "no_grad_gather"
            distributed.all_gather_with_grad = _no_grad_gather if buggy else correct_gather
            results[variant] = {case: run_case(case, local_batches[case], variant) for case in cases}
        distributed.all_gather_with_grad = correct_gather
        results["batch_size_checks"] = batch_size_checks(local_batches["weighted_sum"])
        results["shared_gradient"] = gather_backward_keeps_shared_gradient()
        results["rng"] = rng_round_trip(rank, world_size)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        distributed.all_gather_with_grad = correct_gather
        dist.destroy_process_group()
