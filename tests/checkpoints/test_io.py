from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import ernievil2_train
from ernievil2_train.checkpoints import CheckpointError, find_vocab, load_pretrained, save_pretrained
from tests.models.tiny import tiny_model


def test_round_trip_keeps_weights_config_and_vocab(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_model(logit_scale_init=1.5)
    vocab = tmp_path / "v.txt"
    vocab.write_text("[PAD]\t0\n[CLS]\t1", encoding="utf-8")
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
