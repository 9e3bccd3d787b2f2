"""Resuming a run: the checkpoint it continues from, refused when unreadable or of another model, and what a
Ctrl-C leaves to resume from."""

from __future__ import annotations

import functools
import os
import re
import time
import zipfile
from pathlib import Path

import pytest
import torch

from ernievil2_train.config_checks import ConfigError
from ernievil2_train.models import create_model
from ernievil2_train.module import ErnieVil2Module
from ernievil2_train.resume import (
    check_checkpoint_fits,
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


def test_a_checkpoint_past_max_epochs_is_refused_before_lightning_overwrites_it(tmp_path: Path) -> None:
    """Lightning refuses it only once restored, and saves a checkpoint without optimizer state on its way
    out: the run folder's last.ckpt was lost."""
    saved = _trained_module_checkpoint(tmp_path / "last.ckpt", _module())
    checkpoint = torch.load(saved, weights_only=True)
    torch.save({**checkpoint, "epoch": 2}, saved)
    with pytest.raises(ConfigError, match=re.escape(
        f"config key 'trainer.max_epochs': 1, but {saved} (ckpt) is at epoch 2; resume with "
        "trainer.max_epochs=2 or more, or start a new run folder"
    )):
        check_checkpoint_fits(str(saved), _module(), "ckpt", max_epochs=1)
    for max_epochs in (2, 10, -1, None):
        assert check_checkpoint_fits(str(saved), _module(), "ckpt", max_epochs=max_epochs) == []


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
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_checkpoint_fits(saved, _module(loss={"weights": {"image_caption": 1, "image_tags": 1}}), "ckpt")
