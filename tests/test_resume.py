"""Resuming a run: the checkpoint it continues from, refused when unreadable or of another model, and what a
Ctrl-C leaves to resume from."""

from __future__ import annotations

import functools
import os
import re
import time
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ernievil2_train.config_checks import ConfigError
from ernievil2_train.models import create_model
from ernievil2_train.module import ErnieVil2Module
from ernievil2_train.resume import (
    check_checkpoint_fits,
    epochs_trained,
    interrupted,
    resume_checkpoint,
)
from tests.models.tiny import TINY, tiny_model


def test_resume_picks_the_newest_checkpoint_of_the_run_folder(tmp_path: Path) -> None:
    assert resume_checkpoint(None, tmp_path) is None
    with pytest.raises(ConfigError, match=re.escape(
            f"config key 'ckpt_path': no last checkpoint in {tmp_path} (run folders are named by the time: "
            "resume one with hydra.run.dir=<its folder>)")):
        resume_checkpoint("last", tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    torch.save({}, last)
    assert resume_checkpoint(None, tmp_path) == str(last)
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    torch.save({}, hpc)
    now = time.time()
    os.utime(last, (now - 10, now - 10))
    assert resume_checkpoint(None, tmp_path) == str(hpc)
    assert resume_checkpoint("last", tmp_path) == str(hpc)
    with pytest.raises(ConfigError, match="not found"):
        resume_checkpoint(str(tmp_path / "other.ckpt"), tmp_path)


def test_an_unreadable_checkpoint_is_refused_before_training(tmp_path: Path) -> None:
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, last)
    last.write_bytes(last.read_bytes()[:-100])  # cut short, as by a full disk or a kill mid-write
    message = f"run folder checkpoint {last}; delete it or set ckpt_path"
    with pytest.raises(ConfigError, match=re.escape(message)):
        resume_checkpoint(None, tmp_path)
    with pytest.raises(ConfigError, match=re.escape(f"config key 'ckpt_path': {last}: not a readable")):
        resume_checkpoint(str(last), tmp_path)
    sharded = tmp_path / "sharded.ckpt"
    sharded.mkdir()
    with pytest.raises(ConfigError, match=r"sharded\.ckpt: a folder, not a checkpoint \(a \.ckpt file"):
        resume_checkpoint(str(sharded), tmp_path)
    (sharded / "meta.pt").write_bytes(b"")  # what Lightning's FSDP strategy saves beside the shards
    assert resume_checkpoint(str(sharded), tmp_path) == str(sharded)
    pipe = tmp_path / "pipe.ckpt"
    os.mkfifo(pipe)  # opening it would wait for a writer for ever
    with pytest.raises(ConfigError, match=r"pipe\.ckpt: not a regular file$"):
        resume_checkpoint(str(pipe), tmp_path)


def test_a_damaged_checkpoint_is_refused_before_training(tmp_path: Path) -> None:
    """Bytes overwritten inside a tensor's data keep the file a readable zip: it resumed with weights of
    1e15. The members' checksums tell."""
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(100_000)}}, path)
    assert resume_checkpoint(str(path), tmp_path) == str(path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = b"\x7f" * 16
    path.write_bytes(bytes(data))
    assert zipfile.is_zipfile(path) and torch.load(path, weights_only=True)["state_dict"]["w"].abs().max() > 1
    damaged = re.escape(f"config key 'ckpt_path': {path}: damaged (") + r".*data/0 fails its checksum"
    with pytest.raises(ConfigError, match=damaged):
        resume_checkpoint(str(path), tmp_path)


def _saved_module(path: Path, model: torch.nn.Module) -> Path:
    """A training checkpoint of `model` as `ErnieVil2Module` saves it (weights, model config, optimizer)."""
    module = ErnieVil2Module(model)
    optimizer = module.optimizer_factory(module.param_groups())
    checkpoint = {"state_dict": module.state_dict(), "optimizer_states": [optimizer.state_dict()]}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def test_a_checkpoint_of_another_model_size_is_refused_before_training(tmp_path: Path) -> None:
    larger = {**TINY, "text": {**TINY["text"], "layers": 3, "intermediate_size": 96}}
    saved = _saved_module(tmp_path / "large.ckpt", create_model(larger))
    module = ErnieVil2Module(tiny_model())
    what = "config key 'ckpt_path'"
    differing = "text.layers 3 there, 2 here; text.intermediate_size 96 there, 64 here)"
    message = f"{what}: {saved}: holds another model than this run's ({differing}"
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_checkpoint_fits(str(saved), module, what)
    check_checkpoint_fits(str(_saved_module(tmp_path / "same.ckpt", tiny_model())), module, what)
    older = torch.load(tmp_path / "same.ckpt")  # temperatures were 0-dim tensors before: still resumable
    older["state_dict"]["model.logit_scale"] = older["state_dict"]["model.logit_scale"].reshape(())
    torch.save(older, tmp_path / "older.ckpt")
    check_checkpoint_fits(str(tmp_path / "older.ckpt"), module, what)
    module.load_state_dict(older["state_dict"])


def test_a_checkpoint_without_model_config_names_the_weights_that_differ(tmp_path: Path) -> None:
    deeper = {**TINY, "vision": {**TINY["vision"], "layers": 3}}
    path = tmp_path / "deep.ckpt"
    torch.save({"state_dict": ErnieVil2Module(create_model(deeper)).state_dict()}, path)
    first = r"deep\.ckpt: holds another model than this run's \(unexpected \[model\.vision\.blocks\.2\."
    with pytest.raises(ConfigError, match=first):
        check_checkpoint_fits(str(path), ErnieVil2Module(tiny_model()), "config key 'ckpt_path'")
    torch.save({"weights": {}}, path)
    with pytest.raises(ConfigError, match="not a Lightning training checkpoint"):
        check_checkpoint_fits(str(path), ErnieVil2Module(tiny_model()), "config key 'ckpt_path'")


def test_a_checkpoint_of_weights_only_is_refused_naming_how_to_start_from_them(tmp_path: Path) -> None:
    """`ModelCheckpoint(save_weights_only=True)` leaves out the optimizer state a resume restores."""
    path = tmp_path / "weights.ckpt"
    torch.save({"state_dict": ErnieVil2Module(tiny_model()).state_dict()}, path)
    message = (f"ckpt: {path}: holds weights only (no optimizer state to resume); to start a new run from "
               f"them, export it (python -m ernievil2_train.export {path} DIR) and set model.checkpoint=DIR")
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_checkpoint_fits(str(path), ErnieVil2Module(tiny_model()), "ckpt")
    with pytest.raises(ConfigError, match=re.escape("config key 'ckpt_path': empty; give a checkpoint")):
        resume_checkpoint("", tmp_path)


def test_an_interruption_names_what_resumes_it(tmp_path: Path) -> None:
    assert str(interrupted(tmp_path)) == "no checkpoint was saved yet"
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    torch.save({}, last)
    assert str(interrupted(tmp_path)) == f"ckpt_path=last hydra.run.dir={tmp_path} resumes from {last}"


def _trained_module_checkpoint(path: Path, module: ErnieVil2Module) -> Path:
    """A checkpoint of `module` with the optimizer state and scheduler base learning rates training saves."""
    optimizer = module.optimizer_factory(module.param_groups())
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)  # the scheduled lr is not the setting
    checkpoint = {"state_dict": module.state_dict(), "optimizer_states": [optimizer.state_dict()]}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def _module(lr: float = 1e-3, **settings: object) -> ErnieVil2Module:
    factory = functools.partial(torch.optim.AdamW, lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    return ErnieVil2Module(tiny_model(), optimizer=factory, **settings)


def test_optimizer_settings_a_resume_keeps_are_named(tmp_path: Path) -> None:
    """A resume loads the saved optimizer state, learning rates included: this run's settings that differ from
    it are named, with the parameter groups they concern."""
    saved = str(_trained_module_checkpoint(tmp_path / "last.ckpt", _module()))
    assert check_checkpoint_fits(saved, _module(), "ckpt") == []
    names = [group["name"] for group in _module().param_groups()]
    text = [name for name in names if name.startswith("text/")]
    others = [name for name in names if name not in text]
    assert text and 0 < len(others) <= 3  # few enough to be listed by name
    assert check_checkpoint_fits(saved, _module(lr=1e-2, text_lr=0.5), "ckpt") == [
        f"lr 0.001 there, 0.01 here ({', '.join(others)})",
        f"lr 0.001 there, 0.5 here ({', '.join(text)})",
    ]
    betas = functools.partial(torch.optim.AdamW, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.05)
    assert check_checkpoint_fits(saved, ErnieVil2Module(tiny_model(), optimizer=betas), "ckpt") == [
        f"betas (0.9, 0.98) there, (0.9, 0.99) here (all {len(names)} groups)"
    ]


class _Scalar(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return (self.weight * batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_epochs_a_lightning_checkpoint_has_trained(tmp_path: Path) -> None:
    """Saved at an epoch's end, the epoch is trained; saved after its last batch, before its end (as an
    interruption during its validation saves), it is not: both hold the same `epoch` number."""
    savers = [ModelCheckpoint(dirpath=tmp_path, save_top_k=-1),
              ModelCheckpoint(tmp_path, filename="batch-{step}", save_top_k=-1, every_n_train_steps=3)]
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=savers, accelerator="cpu", devices=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(6, 1)), batch_size=2)
    trainer.fit(_Scalar(), loader)  # 3 batches an epoch
    trained = {path.name: epochs_trained(torch.load(path, weights_only=False)) for path in tmp_path.iterdir()}
    assert trained == {"epoch=0-step=3.ckpt": 1, "epoch=1-step=6.ckpt": 2,
                       "batch-step=3.ckpt": 0, "batch-step=6.ckpt": 1}
    assert epochs_trained({"epoch": 1}) is None


def _with_progress(path: Path, epochs: int, steps: int) -> Path:
    checkpoint = torch.load(path, weights_only=True)
    progress = {"ready": epochs, "started": epochs, "processed": epochs, "completed": epochs - 1}
    loops = {"fit_loop": {"epoch_progress": {"current": progress, "total": progress}}}
    torch.save({**checkpoint, "epoch": epochs - 1, "global_step": steps, "loops": loops}, path)
    return path


def test_a_checkpoint_that_trained_the_runs_epochs_or_steps_is_refused(tmp_path: Path) -> None:
    """Resumed with as many epochs (or steps) as it has trained, Lightning ends at once, exit status 0, and
    nothing trains; past them, it refuses the checkpoint only after overwriting it."""
    saved = _with_progress(_trained_module_checkpoint(tmp_path / "last.ckpt", _module()), epochs=2, steps=40)
    for max_epochs in (1, 2):
        with pytest.raises(ConfigError, match=re.escape(
            f"config key 'trainer.max_epochs': {max_epochs}, but {saved} (ckpt) has trained 2 epoch(s): "
            "nothing is left to train; resume with trainer.max_epochs=3 or more, or start a new run folder"
        )):
            check_checkpoint_fits(str(saved), _module(), "ckpt", max_epochs=max_epochs)
    for max_steps in (10, 40):
        with pytest.raises(ConfigError, match=re.escape(
            f"config key 'trainer.max_steps': {max_steps}, but {saved} (ckpt) has trained 40 step(s): "
            "nothing is left to train"
        )):
            check_checkpoint_fits(str(saved), _module(), "ckpt", max_epochs=-1, max_steps=max_steps)
    for max_epochs, max_steps in ((3, -1), (10, None), (-1, 41), (None, -1), (None, None)):
        assert check_checkpoint_fits(str(saved), _module(), "ckpt", max_epochs, max_steps) == []


def test_a_checkpoint_path_hydra_read_as_a_number_is_a_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "123").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="config key 'ckpt_path': 123: not a readable checkpoint"):
        resume_checkpoint(123, tmp_path / "run")


def test_optimizer_settings_the_optimizer_refuses_are_left_to_the_module(tmp_path: Path) -> None:
    """One beta makes AdamW raise an IndexError: the resume check does not compare settings then (it was a
    traceback); the module refuses them with one line (a torch optimizer's when the module is built, any
    other's when training starts)."""
    saved = str(_trained_module_checkpoint(tmp_path / "last.ckpt", _module()))
    module = ErnieVil2Module(tiny_model())
    module.optimizer_factory = functools.partial(torch.optim.AdamW, lr=1e-3, betas=(0.9,))
    assert check_checkpoint_fits(saved, module, "ckpt") == []


def test_other_parameter_groups_or_losses_are_refused_before_training(tmp_path: Path) -> None:
    """Groups that differ (layer-wise decay turned on, a tower frozen) cannot take the saved optimizer state;
    another set of losses has other learned temperatures."""
    saved = str(_trained_module_checkpoint(tmp_path / "last.ckpt", _module()))
    groups = len(_module().param_groups())
    for settings in ({"layer_decay": 0.8}, {"freeze_text": True}):
        changed = _module(**settings)
        message = (f"ckpt: {saved}: its optimizer state has other parameter groups than this run's ({groups} "
                   f"there, {len(changed.param_groups())} here): resume with the module.freeze_vision")
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_checkpoint_fits(saved, changed, "ckpt")
    message = f"ckpt: {saved}: was trained with other losses than this run's (missing [loss_fn.log_scales."
    with pytest.raises(ConfigError, match=re.escape(message)):  # no saved settings: the states' difference
        check_checkpoint_fits(saved, _module(loss={"weights": {"image_caption": 1, "image_tags": 1}}), "ckpt")


@pytest.mark.parametrize(("loss", "reason"), [
    ({"temperature": "shared"}, "module.loss.temperature per_pair there, shared here"),
    ({"weights": {"image_caption": 1}}, "module.loss.weights: pairs image_caption, image_tags there, "
                                        "image_caption here"),
    ({"weights": {"image_caption": 1}, "temperature": "fixed"},
     "module.loss.weights: pairs image_caption, image_tags there, image_caption here; "
     "module.loss.temperature per_pair there, fixed here"),
])
def test_a_resume_with_other_losses_names_the_settings_that_differ(loss, reason, tmp_path: Path) -> None:
    """The loss settings the checkpoint was trained with are named, not only the temperatures they made."""
    trained = {"weights": {"image_caption": 1, "image_tags": 1}}
    saved = _trained_module_checkpoint(tmp_path / "last.ckpt", _module(loss=trained))
    checkpoint = torch.load(saved, weights_only=True)
    torch.save({**checkpoint, "hyper_parameters": {"loss": trained}}, saved)
    message = (f"ckpt: {saved}: was trained with other losses than this run's ({reason}): resume with the "
               "module.loss.weights and module.loss.temperature it was trained with, or start a new run "
               "folder")
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        check_checkpoint_fits(str(saved), _module(loss={**trained, **loss}), "ckpt")
    assert check_checkpoint_fits(str(saved), _module(loss={**trained, "multi_positive": True}), "ckpt") == []
