"""Validation under real 2-process gloo DDP: each rank validates its own share of the validation shards."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ernievil2_train.data.decode import SKIP_REASONS
from tests.data.ddp_val_worker import module_worker, worker
from tests.data.shard_helpers import image_key, sample, write_shard, write_vocab
from tests.ddp_helpers import run_ranks

pytestmark = pytest.mark.slow  # two spawned processes import Lightning and validate twice

WORLD = 2
PER_SHARD = 5
TIMEOUT_S = 180
MODULE_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """4 training-named shards (the set validated); both ranks' results."""
    data = tmp_path_factory.mktemp("ddp_val")
    write_vocab(data / "vocab.txt")
    for s in range(4):
        write_shard(data / f"train-{s:06d}.tar", [sample(s * PER_SHARD + i) for i in range(PER_SHARD)])
    out = tmp_path_factory.mktemp("ddp_val_out")
    run_ranks(worker, WORLD, (str(data), str(out)), TIMEOUT_S)
    return [{**torch.load(Path(out) / f"rank{r}.pt"), "folder": str(data)} for r in range(WORLD)]


def test_each_rank_validates_its_own_shards_once(ranks: list[dict]) -> None:
    """Without RANK in the environment and inside loader workers, the trainer's rank still splits the
    validation shards: every sample is validated once over all ranks, and the logged total agrees."""
    every = {image_key(ranks[0]["folder"] + "/train.tar", f"img{i}") for i in range(4 * PER_SHARD)}
    seen = [rank["split"]["keys"] for rank in ranks]
    assert [len(keys) for keys in seen] == [2 * PER_SHARD] * WORLD
    assert all(len(set(keys)) == len(keys) for keys in seen)
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == every
    logged = [rank["split"]["samples"] for rank in ranks]
    assert [None if total is None else float(total) for total in logged] == [4 * PER_SHARD] * WORLD


def _corrupt(index: int) -> dict:
    return {**sample(index), "jpg": b"not a jpeg"}


def test_a_rank_without_usable_samples_or_shards_still_joins_the_metric_reduction(tmp_path: Path) -> None:
    """After a DDP training step, rank 1's validation shard holds only undecodable images (it gets one batch
    of skip counts only), then it gets no shard at all (no batch); either way both ranks finish and log the
    same loss, accuracy and skip totals, and every skipped sample is counted."""
    write_vocab(tmp_path / "vocab.txt")
    for s in range(WORLD):
        write_shard(tmp_path / f"train-{s:06d}.tar", [sample(s * PER_SHARD + i) for i in range(PER_SHARD)])
    write_shard(tmp_path / "val-000000.tar", [_corrupt(200), _corrupt(201), *map(sample, range(PER_SHARD))])
    write_shard(tmp_path / "val-000001.tar", [_corrupt(300 + i) for i in range(PER_SHARD)])
    out = tmp_path / "out"
    out.mkdir()
    run_ranks(module_worker, WORLD, (str(tmp_path), str(out)), MODULE_TIMEOUT_S)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    for run, batches, bad_images in (("both", [2, 1], 2 + PER_SHARD), ("one", [2, 0], 2)):
        assert [rank[run]["batches"] for rank in ranks] == batches
        metrics = ranks[0][run]["metrics"]
        assert ranks[1][run]["metrics"] == metrics
        assert math.isfinite(metrics["val/loss_image_caption"])
        assert 0.0 <= metrics["val/acc_image_caption"] <= 1.0
        carried = sum(rank[run]["skipped"] for rank in ranks)
        assert carried[SKIP_REASONS.index("bad_image")] == bad_images
        assert [metrics[f"val/skipped_{reason}"] for reason in SKIP_REASONS] == carried.tolist()
