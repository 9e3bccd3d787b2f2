"""Rank body of the 2-process gloo validation tests (spawned processes import it, so it is not in the test
file). Each rank runs a real Lightning DDP `Trainer.validate`, with the environment Lightning's launcher gives
its processes: WORLD_SIZE, LOCAL_RANK and NODE_RANK, no RANK."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch

from ernievil2_train.config_checks import ConfigError
from ernievil2_train.data.datamodule import MultiViewDataModule


class KeyRecorder(L.LightningModule):
    """Records the image keys each rank validates and logs their number, summed over steps and ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.keys: list[int] = []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.keys += batch["image_key"].tolist()
        size = len(batch["image_key"])
        self.log("val/samples", float(size), reduce_fx="sum", sync_dist=True, batch_size=size)


def _validate(data: Path, val_shards: str, num_workers: int) -> dict:
    """{"keys": this rank's validated image keys, "samples": the logged total over ranks (None if none)}."""
    datamodule = MultiViewDataModule(
        train_shards=str(data / "train-*.tar"), vocab_file=str(data / "vocab.txt"), val_shards=val_shards,
        epoch_samples=20, image_size=32, batch_size=4, val_batch_size=3, num_workers=num_workers,
        persistent_workers=False,
    )
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    model = KeyRecorder()
    (metrics,) = trainer.validate(model, datamodule=datamodule, verbose=False)
    return {"keys": model.keys, "samples": metrics.get("val/samples")}


def worker(rank: int, world_size: int, port: int, data_dir: str, out_dir: str) -> None:
    """Validates a set of 4 shards with 2 loader workers, then tries a set of 1 shard (fewer than ranks)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    os.environ.pop("RANK", None)
    torch.set_num_threads(1)
    data = Path(data_dir)
    results: dict = {"split": _validate(data, str(data / "train-*.tar"), num_workers=2)}
    try:
        _validate(data, str(data / "val-000000.tar"), num_workers=0)
        results["one_shard"] = ""
    except ConfigError as error:
        results["one_shard"] = str(error)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
