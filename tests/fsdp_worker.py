"""Rank body of the FSDP test (spawned processes import it, so it is not in the test file)."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

from ernievil2_train.fsdp import block_wrap_policy
from ernievil2_train.module import ErnieVil2Module
from tests.training_helpers import ALL_PAIRS, make_batch, tiny_model

GLOBAL_BATCH = 8


def temperatures(module: ErnieVil2Module) -> list[float]:
    """The log-scales of the model and of the loss, in a fixed order."""
    params = [module.model.logit_scale, *module.loss_fn.log_scales.values()]
    return [float(p.detach().reshape(-1)[0]) for p in params]


def worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Shard the module as `trainer=fsdp` does (a unit per transformer block, the rest in the root unit, the
    temperatures included), run one training step and save the loss and the temperatures before and after."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        module = ErnieVil2Module(tiny_model(seed=0), loss={"weights": ALL_PAIRS, "temperature": "per_pair"})
        before = temperatures(module)
        wrapped = FullyShardedDataParallel(
            module, auto_wrap_policy=block_wrap_policy(), sharding_strategy=ShardingStrategy.FULL_SHARD,
            use_orig_params=True, device_id=torch.device("cpu"),
        )
        optimizer = torch.optim.AdamW(wrapped.parameters(), lr=0.1)
        size = GLOBAL_BATCH // world_size
        batch = {k: v[rank * size : (rank + 1) * size] for k, v in make_batch(GLOBAL_BATCH, seed=1).items()}
        loss = wrapped(batch)["loss"]
        loss.backward()
        optimizer.step()
        with FullyShardedDataParallel.summon_full_params(wrapped):
            after = temperatures(module)
        torch.save({"loss": float(loss), "before": before, "after": after}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
