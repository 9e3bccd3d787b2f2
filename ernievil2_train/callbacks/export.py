"""Export the best model in the converted format (`model.safetensors` + `config.json` + `vocab.txt`)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP


def model_weights(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, torch.Tensor] | None:
    """The full weights of `pl_module.model` when the strategy shards them (FSDP): gathered from every rank,
    so all ranks must call this; complete on rank 0 only. None otherwise (read `pl_module.model` directly)."""
    wrapper = trainer.strategy.model
    if not isinstance(wrapper, FSDP):
        return None
    # gathered into host memory from a GPU; on CPU there is nothing to offload (and torch 2.13's CPU
    # offload of a gathered state dict crashes the process)
    offload = trainer.strategy.root_device.type != "cpu"
    config = FullStateDictConfig(offload_to_cpu=offload, rank0_only=True)
    with FSDP.state_dict_type(wrapper, StateDictType.FULL_STATE_DICT, config):
        full = wrapper.state_dict()
    return {name.removeprefix("model."): t for name, t in full.items() if name.startswith("model.")}


class ExportBestModel(pl.Callback):
    """At each training epoch end, export `pl_module.model` to `dirpath` when `monitor` improved.

    List it after the callback that logs `monitor` (the retrieval callback). The export is what `embed`,
    `evaluate` and `similarity` load directly. Without the monitored metric (e.g. no eval set), the model at
    the end of training is exported.
    """

    def __init__(
        self,
        dirpath: str,
        monitor: str = "retrieval/mean_recall",
        mode: str = "max",
        vocab_file: str | None = None,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"ExportBestModel.mode must be 'max' or 'min', got {mode!r}")
        self.dirpath = Path(dirpath)
        self.monitor = monitor
        self.mode = mode
        self.vocab_file = vocab_file
        self.best: float | None = None

    def _improved(self, value: float) -> bool:
        """Strictly better than the best so far; NaN never is (as in `ModelCheckpoint`, which then keeps the
        same epoch as its best)."""
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from ernievil2_train.checkpoints.io import save_pretrained

        weights = model_weights(trainer, pl_module)
        if trainer.is_global_zero:
            save_pretrained(pl_module.model, self.dirpath, vocab_file=self.vocab_file, state_dict=weights)
        trainer.strategy.barrier("export_best_model")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor not in trainer.callback_metrics:
            return
        value = float(torch.as_tensor(trainer.callback_metrics[self.monitor]))
        if self._improved(value):
            self.best = value
            self._export(trainer, pl_module)
            rank_zero_info(f"exported best model ({self.monitor}={value:.4f}) to {self.dirpath}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.best is None:
            self._export(trainer, pl_module)
            rank_zero_info(f"exported final model to {self.dirpath}")

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict.get("best")
