"""FSDP sharding of the training module, in 2 gloo processes on CPU: torch's FSDP, and Lightning's FSDP
strategy (made to wrap for the CPU) through a training step and a validation pass."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ernievil2_train.checkpoints import load_pretrained
from tests.data.shard_helpers import sample, write_shard, write_vocab
from tests.ddp_helpers import run_ranks
from tests.fsdp_worker import lightning_worker, worker

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


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_pretrained(folder).state_dict()


def _assert_close(ours: dict[str, float | torch.Tensor], theirs: dict[str, float | torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert torch.allclose(torch.as_tensor(ours[name]), torch.as_tensor(value), rtol=1e-5, atol=1e-6), name


def test_lightning_fsdp_trains_validates_exports_and_resumes_as_ddp(tmp_path: Path) -> None:
    """Lightning's FSDP strategy, sharded as `trainer=fsdp`: every forward gathers parameters from all ranks.
    Rank 0's validation shard holds only undecodable images (one batch of skip counts), rank 1's gives four
    batches: both ranks make four validation steps (rank 0 pads three), nobody waits forever, and the logged
    metrics are DDP's. The exported weights after a step, gradients clipped, are DDP's; resumed from its
    sharded checkpoint for a second step, the run exports what two DDP steps give."""
    data = tmp_path / "data"
    data.mkdir()
    write_vocab(data / "vocab.txt")
    for s in range(WORLD):
        write_shard(data / f"train-{s:06d}.tar", [sample(s * 4 + i) for i in range(4)])
    corrupt = [{**sample(100 + i), "jpg": b"not a jpeg"} for i in range(2)]
    write_shard(data / "val-000000.tar", corrupt)
    write_shard(data / "val-000001.tar", [sample(40 + i) for i in range(11)])
    run_ranks(lightning_worker, WORLD, (str(data), str(tmp_path)), timeout_s=420)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert [(rank["fsdp"]["steps"], rank["fsdp"]["padding"]) for rank in ranks] == [(4, 3), (4, 0)]
    assert [rank["ddp"]["steps"] for rank in ranks] == [1, 4]
    sharded = ranks[0]["fsdp"]["metrics"]
    assert ranks[1]["fsdp"]["metrics"] == sharded and sharded["val/skipped_bad_image"] == 2
    _assert_close(sharded, ranks[0]["ddp"]["metrics"])
    _assert_close(_weights(tmp_path / "fsdp" / "export"), _weights(tmp_path / "ddp" / "export"))
    assert (tmp_path / "fsdp" / "ckpt" / "last.ckpt").is_dir()  # sharded: a folder of rank shards
    before = _weights(tmp_path / "fsdp" / "export")
    resumed = _weights(tmp_path / "fsdp_resumed" / "export")
    assert any(not torch.equal(resumed[name], before[name]) for name in before)
    _assert_close(resumed, _weights(tmp_path / "ddp_two_steps" / "export"))
