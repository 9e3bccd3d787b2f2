"""Rank bodies of the 2-process gloo validation tests (spawned processes import them, so they are not in the
test file). Each rank runs a real Lightning DDP `Trainer.validate`, with the environment Lightning's launcher
gives its processes: WORLD_SIZE, LOCAL_RANK and NODE_RANK, no RANK."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch

from ernievil2_train.data.datamodule import MultiViewDataModule
from ernievil2_train.data.decode import SKIP_REASONS
from ernievil2_train.module import ErnieVil2Module
from tests.training_helpers import IMAGE_SIZE, tiny_model


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


class BatchRecorder(L.Callback):
    """Counts this rank's validation batches and sums the skip counts they carry."""

    def __init__(self) -> None:
        self.batches = 0
        self.skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.batches += 1
        self.skipped += batch["skipped"].cpu()


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, **kwargs)


def _join(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    os.environ.pop("RANK", None)
    torch.set_num_threads(1)


def _validate(data: Path, val_shards: str, num_workers: int) -> dict:
    """{"keys": this rank's validated image keys, "samples": the logged total over ranks (None if none)}."""
    datamodule = MultiViewDataModule(
        train_shards=str(data / "train-*.tar"), vocab_file=str(data / "vocab.txt"), val_shards=val_shards,
        epoch_samples=20, image_size=32, batch_size=4, val_batch_size=3, num_workers=num_workers,
        persistent_workers=False,
    )
    model = KeyRecorder()
    (metrics,) = _trainer().validate(model, datamodule=datamodule, verbose=False)
    return {"keys": model.keys, "samples": metrics.get("val/samples")}


def worker(rank: int, world_size: int, port: int, data_dir: str, out_dir: str) -> None:
    """Validates a set of 4 shards with 2 loader workers."""
    _join(rank, world_size, port)
    data = Path(data_dir)
    results = {"split": _validate(data, str(data / "train-*.tar"), num_workers=2)}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _validate_module(data: Path, val_shards: str) -> dict:
    """A tiny `ErnieVil2Module` trained one step under DDP, then validated on `val_shards` (the first
    forward through the DDP wrapper after a training step): the metrics and what this rank's batches held."""
    datamodule = MultiViewDataModule(
        train_shards=str(data / "train-*.tar"), vocab_file=str(data / "vocab.txt"), val_shards=val_shards,
        epoch_samples=8, image_size=IMAGE_SIZE, batch_size=4, val_batch_size=3, num_workers=0,
        text_max_len=16, persistent_workers=False,
    )
    recorder = BatchRecorder()
    trainer = _trainer(callbacks=[recorder], max_steps=1, num_sanity_val_steps=0)
    trainer.fit(ErnieVil2Module(tiny_model()), datamodule=datamodule)
    logged = trainer.callback_metrics
    metrics = {name: value.item() for name, value in logged.items() if name.startswith("val/")}
    return {"metrics": metrics, "batches": recorder.batches, "skipped": recorder.skipped}


def module_worker(rank: int, world_size: int, port: int, data_dir: str, out_dir: str) -> None:
    """Trains and validates on both `val-*.tar` shards (one a rank), then on the first alone (rank 1 has
    none)."""
    _join(rank, world_size, port)
    data = Path(data_dir)
    results = {"both": _validate_module(data, str(data / "val-*.tar")),
               "one": _validate_module(data, str(data / "val-000000.tar"))}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
