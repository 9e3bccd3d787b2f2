"""Validation under real 2-process gloo DDP: each rank validates its own share of the validation shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ernievil2_train.data.keys import stable_key
from tests.data.ddp_val_worker import worker
from tests.data.shard_helpers import sample, write_shard, write_vocab
from tests.ddp_helpers import run_ranks

pytestmark = pytest.mark.slow  # two spawned processes import Lightning and validate twice

WORLD = 2
PER_SHARD = 5
TIMEOUT_S = 180


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """4 training-named shards (the set validated) and 1 val shard; both ranks' results."""
    data = tmp_path_factory.mktemp("ddp_val")
    write_vocab(data / "vocab.txt")
    for s in range(4):
        write_shard(data / f"train-{s:06d}.tar", [sample(s * PER_SHARD + i) for i in range(PER_SHARD)])
    write_shard(data / "val-000000.tar", [sample(100 + i) for i in range(PER_SHARD)])
    out = tmp_path_factory.mktemp("ddp_val_out")
    run_ranks(worker, WORLD, (str(data), str(out)), TIMEOUT_S)
    return [torch.load(Path(out) / f"rank{r}.pt") for r in range(WORLD)]


def test_each_rank_validates_its_own_shards_once(ranks: list[dict]) -> None:
    """Without RANK in the environment and inside loader workers, the trainer's rank still splits the
    validation shards: every sample is validated once over all ranks, and the logged total agrees."""
    every = {stable_key(f"img{i}") for i in range(4 * PER_SHARD)}
    seen = [rank["split"]["keys"] for rank in ranks]
    assert [len(keys) for keys in seen] == [2 * PER_SHARD] * WORLD
    assert all(len(set(keys)) == len(keys) for keys in seen)
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == every
    logged = [rank["split"]["samples"] for rank in ranks]
    assert [None if total is None else float(total) for total in logged] == [4 * PER_SHARD] * WORLD


def test_fewer_val_shards_than_ranks_stop_every_rank_with_a_clear_error(ranks: list[dict]) -> None:
    """One validation shard for two ranks: both refuse it (no rank is left waiting for the other)."""
    for rank in ranks:
        assert rank["one_shard"].startswith("data.val_shards: 1 validation shards for 2 ranks"), rank
