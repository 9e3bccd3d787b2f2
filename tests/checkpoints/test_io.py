from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ernievil2_train
from ernievil2_train.checkpoints import (
    CheckpointError,
    find_vocab,
    load_pretrained,
    load_training_checkpoint,
    save_pretrained,
)
from ernievil2_train.checkpoints.io import _current_umask
from ernievil2_train.models import DualEncoder, DualEncoderConfig, memory
from tests.data.shard_helpers import write_vocab
from tests.models.tiny import TINY, tiny_model

SPECIALS = "[PAD]\t0\n[CLS]\t1\n[SEP]\t2\n[UNK]\t3\n"


def test_round_trip_keeps_weights_config_and_vocab(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_model(logit_scale_init=1.5)
    vocab = tmp_path / "v.txt"
    vocab.write_text("[PAD]\t0\n[CLS]\t1\n[SEP]\t2\n[UNK]\t3", encoding="utf-8")
    out = save_pretrained(model, tmp_path / "ckpt", vocab_file=vocab)
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "vocab.txt"}
    assert find_vocab(out) == out / "vocab.txt" and find_vocab(tmp_path) is None
    loaded = ernievil2_train.load_pretrained(out)
    assert not loaded.training and loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    ids = torch.tensor([[1, 5, 9, 2, 0]])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids), loaded.encode_text(ids))


def test_a_save_without_vocabulary_keeps_the_earlier_one_only_if_it_fits(tmp_path: Path) -> None:
    """Re-saving a model keeps its folder's vocabulary; weights of a smaller vocab size do not get one whose
    ids they have no embeddings for."""
    vocab = write_vocab(tmp_path / "vocab.txt", chars="一二三")
    model = tiny_model()
    out = save_pretrained(model, tmp_path / "ckpt", vocab_file=vocab)
    save_pretrained(model, out)
    assert find_vocab(out).read_bytes() == vocab.read_bytes()
    smaller = DualEncoderConfig.from_dict({**TINY, "text": {**TINY["text"], "vocab_size": 4}})
    save_pretrained(DualEncoder(smaller), out)
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json"}


def test_saved_files_get_the_mode_the_umask_gives(tmp_path: Path) -> None:
    """Others on a shared machine can read an exported model as they can its config (safetensors alone
    writes its file owner-only)."""
    previous = os.umask(0o022)
    try:
        out = save_pretrained(tiny_model(), tmp_path / "out")
    finally:
        os.umask(previous)
    modes = {name: (out / name).stat().st_mode & 0o777 for name in ("model.safetensors", "config.json")}
    assert modes == {"model.safetensors": 0o644, "config.json": 0o644}


@pytest.mark.parametrize("umask", [0o027, 0o002])
def test_the_umask_is_read_without_changing_it(umask: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Setting the umask to read it is process-wide: another thread writing a file meanwhile would get
    mode 0666. On Linux it is read from /proc instead."""
    previous = os.umask(umask)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(os, "umask", lambda mask: pytest.fail("the umask was changed to read it"))
            assert _current_umask() == umask
    finally:
        os.umask(previous)


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"missing config.json, model.safetensors"):
        load_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="vocabulary file not found"):
        save_pretrained(tiny_model(), tmp_path / "x", vocab_file=tmp_path / "missing.txt")
    out = save_pretrained(tiny_model(), tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    config["text"]["layers"] = 1
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=re.escape("weights do not match config.json")):
        load_pretrained(out)
    config["text"]["colour"] = 1
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown text config field"):
        load_pretrained(out)


def _one_line_error(call, *args) -> str:
    with pytest.raises(CheckpointError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("section", "key", "value", "match"),
    [
        ("text", "heads", 0, "text.heads must be a positive integer, got 0"),
        ("vision", "layers", "two", "vision.layers must be a positive integer, got 'two'"),
        ("vision", "width", -32, "vision.width must be a positive integer, got -32"),
        ("text", "vocab_size", True, "text.vocab_size must be a positive integer, got True"),
        ("text", "dropout", 1.5, "text.dropout must be in [0, 1), got 1.5"),
        ("vision", "mlp_ratio", "4", "vision.mlp_ratio must be a finite number, got '4'"),
    ],
)
def test_invalid_config_numbers_name_the_file_and_field(
    tmp_path: Path, section: str, key: str, value: object, match: str
) -> None:
    out = save_pretrained(tiny_model(), tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    config[section][key] = value
    (out / "config.json").write_text(json.dumps(config))
    message = _one_line_error(load_pretrained, out)
    assert message == f"{out / 'config.json'}: invalid model config ({match})"


def test_config_json_must_be_an_object(tmp_path: Path) -> None:
    out = save_pretrained(tiny_model(), tmp_path / "ckpt")
    (out / "config.json").write_text("[1, 2]")
    assert "must be a JSON object, not a list" in _one_line_error(load_pretrained, out)
    (out / "config.json").write_text('{"vision": null}')
    assert "vision config must be a mapping" in _one_line_error(load_pretrained, out)
    (out / "config.json").write_text("{oops")
    assert f"{out / 'config.json'}: not valid JSON" in _one_line_error(load_pretrained, out)


def test_unwritable_output_folder_is_a_checkpoint_error(tmp_path: Path) -> None:
    existing = tmp_path / "a_file"
    existing.write_text("keep me")
    message = _one_line_error(save_pretrained, tiny_model(), existing)
    assert message == f"{existing}: cannot write the checkpoint folder (File exists)"
    below = existing / "sub"
    message = _one_line_error(save_pretrained, tiny_model(), below)
    assert message.startswith(f"{below}: cannot write the checkpoint folder (")
    assert existing.read_text() == "keep me"


@pytest.mark.parametrize("name", ["model.safetensors", "vocab.txt", "config.json"])
def test_a_folder_in_place_of_a_checkpoint_file_is_refused_before_anything_is_written(
    tmp_path: Path, name: str
) -> None:
    vocab = write_vocab(tmp_path / "vocab.txt")
    out = save_pretrained(tiny_model(), tmp_path / "out")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    for path in out.iterdir():
        if path.name == name:
            path.unlink()
    (out / name).mkdir()
    message = _one_line_error(save_pretrained, tiny_model(), out, vocab)
    assert message == f"{out / name}: is a folder; a checkpoint folder holds a file of that name"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != name} == {
        k: v for k, v in before.items() if k != name
    }


def test_vocabulary_is_checked_before_the_folder_is_made(tmp_path: Path) -> None:
    model = tiny_model()
    vocab_size = model.config.text.vocab_size
    out = tmp_path / "out"
    garbage = tmp_path / "garbage.txt"
    garbage.write_bytes(bytes(range(128, 256)) * 8)
    too_big = tmp_path / "big.txt"
    too_big.write_text(f"{SPECIALS}word\t{vocab_size}\n", encoding="utf-8")
    no_specials = tmp_path / "plain.txt"
    no_specials.write_text("a\nb\n", encoding="utf-8")
    cases = [
        (garbage, "UTF-8"),
        (too_big, f"ids go up to {vocab_size} but the model's text vocab_size is {vocab_size}"),
        (no_specials, "lacks the special token(s)"),
        (tmp_path / "missing.txt", "vocabulary file not found"),
        (tmp_path, "is a folder, not a vocabulary file"),
    ]
    for vocab, match in cases:
        message = _one_line_error(save_pretrained, model, out, vocab)
        assert match in message and str(vocab) in message and message.count(str(vocab)) == 1, message
        assert not out.exists()
    fits = tmp_path / "fits.txt"
    fits.write_text(f"{SPECIALS}word\t{vocab_size - 1}\n", encoding="utf-8")
    save_pretrained(model, out, vocab_file=fits)
    save_pretrained(model, out, vocab_file=out / "vocab.txt")  # overwriting a folder with its own vocab
    assert find_vocab(out).read_bytes() == fits.read_bytes()


def _training_checkpoint(path: Path, config: object) -> Path:
    state = {f"model.{k}": v for k, v in tiny_model().state_dict().items()}
    torch.save({"state_dict": state, "model_config": config}, path)
    return path


def test_training_checkpoint_config_errors_name_the_file(tmp_path: Path) -> None:
    good = _training_checkpoint(tmp_path / "good.ckpt", TINY)
    assert load_training_checkpoint(good).config == tiny_model().config
    for i, (section, key, value) in enumerate([("vision", "heads", 0), ("text", "layers", "two")]):
        config = {**TINY, section: {**TINY[section], key: value}}
        path = _training_checkpoint(tmp_path / f"bad{i}.ckpt", config)
        message = _one_line_error(load_training_checkpoint, path)
        assert message.startswith(f"{path}: invalid model config ({section}.{key} must be a positive integer")
    path = _training_checkpoint(tmp_path / "list.ckpt", [1, 2])
    message = _one_line_error(load_training_checkpoint, path)
    assert message == f"{path}: invalid model config (model config must be a mapping of fields, got list)"


def test_unreadable_training_checkpoints(tmp_path: Path, paddle_ref: Path) -> None:
    good = _training_checkpoint(tmp_path / "good.ckpt", TINY)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    message = _one_line_error(load_training_checkpoint, cut)
    assert message.startswith(f"{cut}: not a readable training checkpoint (RuntimeError: ")
    assert len(message) < len(str(cut)) + 200
    pdparams = tmp_path / "pd.ckpt"
    pdparams.write_bytes((paddle_ref / "model.pdparams").read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        message = _one_line_error(load_training_checkpoint, pdparams)
    assert "a plain pickle (a .pdparams file?), not a torch zip archive" in message
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    assert "(the file is empty)" in _one_line_error(load_training_checkpoint, empty)
    npz = tmp_path / "arrays.ckpt"
    npz.write_bytes((paddle_ref / "inputs.npz").read_bytes())
    message = _one_line_error(load_training_checkpoint, npz)
    assert message == f"{npz}: not a readable training checkpoint (a zip archive without the data.pkl of " \
                      "torch.save, a .npz?)"


def test_a_folder_is_not_a_training_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    message = _one_line_error(load_training_checkpoint, run)
    assert message == f"{run}: is a folder; pass a .ckpt file (e.g. {run / 'checkpoints' / 'last.ckpt'})"
    _training_checkpoint(run / "last.ckpt", TINY)
    assert f"(e.g. {run / 'last.ckpt'})" in _one_line_error(load_training_checkpoint, run)
    assert "consolidate" not in _one_line_error(load_training_checkpoint, run)
    sharded = tmp_path / "last.ckpt"
    sharded.mkdir()
    (sharded / "meta.pt").write_bytes(b"")
    (sharded / "__0_0.distcp").write_bytes(b"")
    message = _one_line_error(load_training_checkpoint, sharded)
    assert "sharded (FSDP) checkpoint folder" in message and "consolidate_checkpoint" in message


def _folder_with_weights(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A saved tiny model's folder whose `model.safetensors` holds the weights as `edit` changed them."""
    folder = save_pretrained(tiny_model(), path)
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"))
    return folder


def _checkpoint_with_weights(path: Path, edit: Callable[[dict[str, object]], None]) -> Path:
    """A tiny training checkpoint whose `state_dict` is as `edit` changed it."""
    ckpt = _training_checkpoint(path, TINY)
    saved = torch.load(ckpt, weights_only=True)
    edit(saved["state_dict"])
    torch.save(saved, ckpt)
    return ckpt


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_of_a_diverged_training_are_refused_naming_the_file(bad: float, tmp_path: Path) -> None:
    """NaN weights would give NaN embeddings and similarities, written without a word."""

    def diverge_folder(state: dict[str, torch.Tensor]) -> None:
        state["text.ernie.embeddings.word_embeddings.weight"][3, 1] = bad

    def diverge_checkpoint(state: dict[str, object]) -> None:
        for name in ("model.logit_scale", "model.vision.pos_embed"):
            state[name].view(-1)[0] = bad

    folder = _folder_with_weights(tmp_path / "diverged", diverge_folder)
    message = _one_line_error(load_pretrained, folder)
    assert message == (f"{folder / 'model.safetensors'}: NaN or infinite weights in "
                       "[text.ernie.embeddings.word_embeddings.weight] (saved from a diverged training?)")
    ckpt = _checkpoint_with_weights(tmp_path / "diverged.ckpt", diverge_checkpoint)
    message = _one_line_error(load_training_checkpoint, ckpt)
    assert message.startswith(f"{ckpt}: NaN or infinite weights in [")
    assert "logit_scale" in message and "vision.pos_embed" in message


def test_weights_that_are_not_floating_point_tensors_are_refused(tmp_path: Path) -> None:
    """Integer or boolean weights would be cast on loading without a word; a non-tensor is no weight."""

    def integers(state: dict[str, torch.Tensor]) -> None:
        state["vision.pos_embed"] = state["vision.pos_embed"].to(torch.int32)
        state["logit_scale"] = state["logit_scale"].bool()

    folder = _folder_with_weights(tmp_path / "ints", integers)
    message = _one_line_error(load_pretrained, folder)
    assert message == (f"{folder / 'model.safetensors'}: weights that are not floating-point tensors: "
                       "[vision.pos_embed (torch.int32), logit_scale (torch.bool)]")
    no_tensor = {"model.vision.cls_token": None}
    ckpt = _checkpoint_with_weights(tmp_path / "odd.ckpt", lambda state: state.update(no_tensor))
    message = _one_line_error(load_training_checkpoint, ckpt)
    assert message == f"{ckpt}: weights that are not floating-point tensors: [vision.cls_token (NoneType)]"


def test_a_folder_with_a_zero_dim_logit_scale_still_loads(tmp_path: Path) -> None:
    """Folders written while temperatures were 0-dim tensors load into the 1-element parameter."""
    folder = _folder_with_weights(tmp_path / "old", lambda state: state.update(logit_scale=torch.tensor(3.5)))
    model = load_pretrained(folder)
    assert model.logit_scale.shape == (1,) and model.logit_scale.item() == 3.5


def test_a_failed_save_leaves_the_earlier_checkpoint_as_it_was(tmp_path: Path) -> None:
    """The config cannot be staged (its temporary name is taken by a folder) after the weights are: the
    folder still holds the earlier save's files, all of them, and nothing of the failed one."""
    vocab = write_vocab(tmp_path / "vocab.txt", chars="一二三")
    out = save_pretrained(tiny_model(), tmp_path / "ckpt", vocab_file=vocab)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    blocker = out / ".config.json.tmp"
    blocker.mkdir()
    other = tiny_model()
    torch.nn.init.ones_(other.vision.patch_embed.proj.weight)
    with pytest.raises(CheckpointError, match=r"ckpt: cannot write the checkpoint folder"):
        save_pretrained(other, out, vocab_file=vocab)
    blocker.rmdir()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_an_empty_folder_path_is_refused() -> None:
    with pytest.raises(CheckpointError, match="the checkpoint folder path is empty"):
        save_pretrained(tiny_model(), "")


@pytest.mark.parametrize(
    ("tower", "field", "value", "message"),
    [
        ("vision", "layers", 100_000, "vision.layers is 100000, the weights hold 2"),
        ("text", "intermediate_size", 10**9, "wrong shape [text.ernie.encoder.layer.0.intermediate.dense"),
    ],
)
def test_a_config_of_other_sizes_than_its_weights_is_refused_before_building(
    tmp_path: Path, tower: str, field: str, value: int, message: str
) -> None:
    """A mistyped size could ask for more memory than the machine has (or build for hours): the config is
    checked against the weights' names and shapes, read from the file's header, before anything is built."""
    out = save_pretrained(tiny_model(), tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    config[tower][field] = value
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as caught:
        load_pretrained(out)
    assert str(caught.value).startswith(f"{out / 'model.safetensors'}: weights do not match config.json (")
    assert message in str(caught.value)


def test_weights_beyond_the_available_memory_are_refused_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted on the meta-device model built to check the weights' shapes, before any memory is taken."""
    folder = save_pretrained(tiny_model(), tmp_path / "ckpt")
    needed = memory.model_bytes(DualEncoderConfig.from_dict(TINY))
    monkeypatch.setattr(memory, "available_memory", lambda: needed - 1)
    refused = f"{folder / 'config.json'}: the model's weights need"
    with pytest.raises(CheckpointError, match=re.escape(refused)):
        load_pretrained(folder)
    monkeypatch.setattr(memory, "available_memory", lambda: needed)
    load_pretrained(folder)
