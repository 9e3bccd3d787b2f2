"""Validation in step across ranks: which strategies need it, and the iteration itself. The two-rank case
(unequal shares under Lightning's FSDP strategy) is in tests/test_fsdp.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from ernievil2_train.data.lockstep import PADDING, Lockstep, shards_parameters


def test_only_strategies_that_shard_parameters_validate_in_step() -> None:
    assert shards_parameters(FSDPStrategy())
    assert not shards_parameters(DDPStrategy())
    assert not shards_parameters(None)


@pytest.fixture
def one_rank(tmp_path: Path) -> Iterator[None]:
    """A gloo process group of this process alone."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_rank_alone_gets_its_batches_and_no_padding(one_rank: None) -> None:
    batches = [{"i": torch.tensor(i)} for i in range(3)]
    assert list(Lockstep(batches, torch.device("cpu"))) == batches
    assert list(Lockstep([], torch.device("cpu"))) == []
    assert PADDING not in list(Lockstep(batches, torch.device("cpu")))
