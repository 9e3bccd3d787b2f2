"""Collectives for the contrastive loss: an all-gather that carries gradients, and world info.

The gradient contract: every rank computes its LOCAL rows against ALL gathered columns and
normalises its loss so that the mean of the per-rank losses is the global-batch loss. The backward of
`all_gather_with_grad` sums the incoming gradient over ranks (all_reduce SUM) and keeps this rank's slice,
so rank r's parameters receive d(sum_s loss_s)/d(params_r). DDP then divides by the world size, which gives
exactly d(global loss)/d(params) = d(mean_s loss_s)/d(params).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

# Rank variables of the launchers: torchrun (RANK, LOCAL_RANK), Lightning's own (LOCAL_RANK, NODE_RANK) and
# srun (SLURM_PROCID; srun starts every task at once, before Lightning sets any of the others).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def is_first_process() -> bool:
    """True unless a launcher's rank variable says this process is not the first (global rank 0)."""
    return all(os.environ.get(name, "0").strip() in ("", "0") for name in RANK_VARIABLES)


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(x: torch.Tensor, world_size: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: cat `x` of all ranks along dim 0. Backward: sum the gradient over ranks, keep own rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rank, world_size = world()
        ctx.rank, ctx.local = rank, x.shape[0]
        return _gather(x, world_size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # a copy: autograd may hand the same gradient tensor to another branch of the graph, which must not
        # see the summed values
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.local : (ctx.rank + 1) * ctx.local]


def check_equal_local_sizes(local_size: int, device: torch.device) -> None:
    """Raise a clear error when ranks hold different local batch sizes (the data loader must drop_last)."""
    _, world_size = world()
    if world_size == 1:
        return
    sizes = _gather(torch.tensor([local_size], device=device), world_size).tolist()
    if len(set(sizes)) != 1:
        raise RuntimeError(
            f"local batch sizes differ across ranks {sizes}: the contrastive loss needs equal batches "
            "per rank (the training loader must drop incomplete batches: drop_last)"
        )


class LocalBatchSize:
    """Checks that all ranks hold the same local batch size without a collective in every step.

    The first call compares the sizes of all ranks with one tiny all-gather (which waits for the device);
    later calls only compare the local size with that first one on the host. Ranks that all keep their
    first size keep equal sizes; a rank whose size changes stops with a clear error instead of entering the
    all-gathers with a mismatched shape.
    """

    def __init__(self) -> None:
        self.size: int | None = None

    def check(self, local_size: int, device: torch.device) -> None:
        _, world_size = world()
        if world_size == 1:
            return
        if self.size is None:
            check_equal_local_sizes(local_size, device)
            self.size = local_size
        elif local_size != self.size:
            raise RuntimeError(
                f"the local batch size changed from {self.size} to {local_size}: the contrastive loss needs "
                "the same full batch on every rank at every step (the training loader must drop incomplete "
                "batches: drop_last)"
            )


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[b, ...] on each rank -> [world_size * b, ...], rank-major; gradients flow back to each rank's rows."""
    _, world_size = world()
    if world_size == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def all_gather_metadata(x: torch.Tensor) -> torch.Tensor:
    """Gather of integer metadata (keys, masks), which has no gradient; rank-major like the features."""
    _, world_size = world()
    if world_size == 1:
        return x
    if x.is_floating_point():
        raise TypeError("all_gather_metadata is for integer metadata; use all_gather_with_grad")
    return _gather(x, world_size)


def all_gather_features(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gather several [b, D] feature sets with ONE collective (stacked to [b, k, D]), gradients included."""
    names = list(features)
    stacked = all_gather_with_grad(torch.stack([features[n] for n in names], dim=1))
    return {n: stacked[:, i] for i, n in enumerate(names)}
