"""ExportBestModel: the export is the best epoch's model (the one ModelCheckpoint keeps), across resumes."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from ernievil2_train.callbacks.export import ExportBestModel
from ernievil2_train.checkpoints import load_pretrained
from tests.metrics.evalset_helpers import tiny_checkpoint

MONITOR = "retrieval/mean_recall"


class Drifting(pl.LightningModule):
    """Every step moves every weight, so each epoch ends with a different model."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return sum(p.sum() for p in self.model.parameters()) * 1e-3 + 0 * batch.sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=1.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.zeros(2, 1), batch_size=1)


class ScriptedMetric(pl.Callback):
    """Logs `MONITOR` from a script (one value per epoch) and keeps each epoch's weights."""

    def __init__(self, values: dict[int, float]) -> None:
        self.values = values
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        pl_module.log(MONITOR, self.values[epoch])
        self.weights[epoch] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}


def _fit(tmp_path: Path, model: torch.nn.Module, values: dict[int, float], ckpt_path: Path | None = None,
         vocab: Path | None = None) -> tuple[ScriptedMetric, ModelCheckpoint]:
    metric = ScriptedMetric(values)
    export = ExportBestModel(str(tmp_path / "export"), monitor=MONITOR, vocab_file=vocab and str(vocab))
    best = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="best-{epoch}", monitor=MONITOR,
                           mode="max", save_top_k=1, save_on_train_epoch_end=True)
    last = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="last", save_on_train_epoch_end=True,
                           enable_version_counter=False)
    trainer = pl.Trainer(max_epochs=len(values), accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[metric, export, best, last])
    trainer.fit(Drifting(model), ckpt_path=ckpt_path)
    return metric, best


def _assert_exported(folder: Path, weights: dict[str, torch.Tensor]) -> None:
    exported = load_pretrained(folder).state_dict()
    assert set(exported) == set(weights)
    for name, value in weights.items():
        assert torch.equal(exported[name], value), name


def _checkpoint_model(path: str) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items()}


@pytest.mark.parametrize("values", [
    {0: 0.2, 1: 0.5, 2: 0.3},
    {0: math.nan, 1: 0.2, 2: 0.1},  # a NaN epoch is never the best
])
def test_export_is_the_best_epoch_and_matches_the_best_checkpoint(tmp_path, values):
    ckpt, model = tiny_checkpoint(tmp_path / "init")
    metric, best = _fit(tmp_path, model.train(), values, vocab=ckpt / "vocab.txt")
    best_epoch = max((e for e in values if not math.isnan(values[e])), key=values.get)
    assert best.best_model_path.endswith(f"best-epoch={best_epoch}.ckpt")
    _assert_exported(tmp_path / "export", metric.weights[best_epoch])
    _assert_exported(tmp_path / "export", _checkpoint_model(best.best_model_path))
    assert (tmp_path / "export" / "vocab.txt").read_bytes() == (ckpt / "vocab.txt").read_bytes()


def test_a_resumed_run_keeps_the_best_score(tmp_path):
    _, model = tiny_checkpoint(tmp_path / "init")
    first, _ = _fit(tmp_path, model.train(), {0: 0.2, 1: 0.5})
    _, fresh = tiny_checkpoint(tmp_path / "init2")
    _fit(tmp_path, fresh.train(), {0: 0.2, 1: 0.5, 2: 0.4}, ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    _assert_exported(tmp_path / "export", first.weights[1])  # epoch 2 (0.4) is worse than epoch 1 (0.5)
