"""Validation batches in step across ranks, for strategies whose every forward is a collective.

Under FSDP each forward gathers the sharded parameters from every rank, so every rank must make the same
number of forwards. Ranks validate their own shards, though, and their batch counts differ. `Lockstep`
asks all ranks before each batch whether any still has one (one small all-reduce); a rank that is done
yields `PADDING` batches until all are, and the module runs a throwaway forward for each (not counted).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

PADDING: dict[str, Any] = {"padding": True}


def shards_parameters(strategy: Any) -> bool:
    """Whether `strategy` (a Lightning strategy) shards the parameters, so that every forward is a
    collective all ranks must join."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    return isinstance(strategy, FSDPStrategy | ModelParallelStrategy)


class Lockstep:
    """`batches`, then `PADDING` until every rank has run out; all ranks stop at the same step.

    Args:
        batches: this rank's batches.
        device: where the all-reduce's flag lives (the rank's device: a CUDA device under NCCL).
    """

    def __init__(self, batches: Iterable[dict[str, Any]], device: torch.device) -> None:
        self.batches, self.device = batches, device

    def __iter__(self) -> Iterator[dict[str, Any]]:
        mine = iter(self.batches)
        while True:
            batch = next(mine, None)
            more = torch.tensor([batch is not None], dtype=torch.int32, device=self.device)
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if not more.item():
                return
            yield PADDING if batch is None else batch
