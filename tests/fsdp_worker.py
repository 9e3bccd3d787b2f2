"""Rank body of the FSDP test (spawned processes import it, so it is not in the test file)."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

from ernievil2_train.callbacks.export import ExportBestModel
from ernievil2_train.data.datamodule import MultiViewDataModule
from ernievil2_train.fsdp import block_wrap_policy
from ernievil2_train.module import ErnieVil2Module
from tests.training_helpers import ALL_PAIRS, IMAGE_SIZE, make_batch, tiny_model

GLOBAL_BATCH = 8
CLIP = 1e-3  # below the tiny model's gradient norms


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


class CpuFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP strategy on CPU processes: Lightning refuses FSDP without a GPU accelerator and wraps
    the module for a CUDA device, so the module is wrapped here for the CPU (as `trainer=fsdp` configures
    it: a unit per block), and everything else is Lightning's own."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        policy = self.kwargs.pop("auto_wrap_policy")
        wrapped = FullyShardedDataParallel(
            model, auto_wrap_policy=policy, sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"), **self.kwargs,
        )
        return super()._setup_model(wrapped)


class StepRecorder(L.Callback):
    """Counts this rank's validation steps and the padding steps among them."""

    def __init__(self) -> None:
        self.steps = self.padding = 0

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.steps += 1
        self.padding += int(batch.get("padding", False))


def _fit(data: Path, out: Path, strategy: Strategy | str, steps: int, resume: Path | None = None) -> dict:
    """`steps` training steps of the tiny module (one an epoch, each followed by a validation pass), saving
    the last checkpoint into `out/ckpt` and exporting the final model into `out/export`; the logged
    validation metrics and this rank's step counts of the last pass."""
    datamodule = MultiViewDataModule(
        train_shards=str(data / "train-*.tar"), vocab_file=str(data / "vocab.txt"),
        val_shards=str(data / "val-*.tar"), epoch_samples=8, image_size=IMAGE_SIZE, batch_size=4,
        val_batch_size=3, num_workers=0, text_max_len=16, persistent_workers=False,
    )
    recorder = StepRecorder()
    callbacks = [recorder, ModelCheckpoint(dirpath=out / "ckpt", save_last=True),
                 ExportBestModel(str(out / "export"))]
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, max_steps=steps, num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    # one schedule for every run; a clipping norm below the gradient's: FSDP's clipping spans all shards
    module = ErnieVil2Module(tiny_model(), scheduler={"total_steps": 4}, gradient_clip_val=CLIP)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return {"metrics": metrics, "steps": recorder.steps, "padding": recorder.padding}


def _fsdp() -> CpuFSDPStrategy:
    """Sharded as `trainer=fsdp` configures it: a unit per block, sharded checkpoints."""
    return CpuFSDPStrategy(auto_wrap_policy=block_wrap_policy(), use_orig_params=True,
                           state_dict_type="sharded")


def lightning_worker(rank: int, world_size: int, port: int, data_dir: str, out_dir: str) -> None:
    """One step under Lightning's FSDP strategy and under DDP; then the FSDP run resumed from its sharded
    checkpoint for a second step, and two DDP steps."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    data, out = Path(data_dir), Path(out_dir)
    results = {
        "fsdp": _fit(data, out / "fsdp", _fsdp(), steps=1),
        "ddp": _fit(data, out / "ddp", "ddp", steps=1),
        "fsdp_resumed": _fit(data, out / "fsdp_resumed", _fsdp(), steps=2,
                             resume=out / "fsdp" / "ckpt" / "last.ckpt"),
        "ddp_two_steps": _fit(data, out / "ddp_two_steps", "ddp", steps=2),
    }
    torch.save(results, out / f"rank{rank}.pt")
