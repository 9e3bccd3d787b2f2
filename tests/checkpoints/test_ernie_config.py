"""The release's ERNIE text config: heads and dropout rates from it, its sizes checked against the weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ernievil2_train.checkpoints import CheckpointError, load_pdparams
from ernievil2_train.checkpoints.ernie_config import ernie_heads, read_ernie_config, with_ernie_config
from ernievil2_train.models import TextConfig
from tests.checkpoints.reference import reference_heads


def _ernie(ref: Path) -> dict[str, Any]:
    """The reference model's ERNIE config dict (config.json keeps it as the official file has it)."""
    return json.loads((ref / "config.json").read_text())["text"]


def _write(path: Path, ernie: Any) -> Path:
    path.write_text(json.dumps(ernie))
    return path


def test_the_text_heads_and_dropout_come_from_the_config(paddle_ref: Path, tmp_path: Path) -> None:
    ernie = {**_ernie(paddle_ref), "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.25}
    vision_heads, text_heads = reference_heads(paddle_ref)
    path = _write(tmp_path / "e.json", ernie)
    model = load_pdparams(paddle_ref / "model.pdparams", vision_heads, text_config=path)
    text = model.config.text
    assert (text.heads, text.dropout, text.attention_dropout) == (text_heads, 0.0, 0.25)
    assert text.width == ernie["hidden_size"] and text.layers == ernie["num_hidden_layers"]


SIZES = ["hidden_size", "num_hidden_layers", "vocab_size", "max_position_embeddings"]


@pytest.mark.parametrize("key", SIZES)
def test_a_config_of_another_size_is_refused(paddle_ref: Path, tmp_path: Path, key: str) -> None:
    ernie = _ernie(paddle_ref)
    path = _write(tmp_path / "other.json", {**ernie, key: ernie[key] * 2})
    refused = (rf"^{path}: {key} is {ernie[key] * 2}, but the text tower of .*model\.pdparams has "
               rf"{ernie[key]} \(another model's config\?\)$")
    with pytest.raises(CheckpointError, match=refused):
        load_pdparams(paddle_ref / "model.pdparams", text_config=path)


def test_a_config_of_another_size_is_named_before_its_heads_that_do_not_fit(paddle_ref: Path,
                                                                          tmp_path: Path) -> None:
    """The release's Base config on a small model: its width, not its 12 heads that do not divide the
    model's width, is what tells it is another model's."""
    ernie = _ernie(paddle_ref)
    width = ernie["hidden_size"]
    heads = next(h for h in range(2, width + 2) if width % h)
    path = _write(tmp_path / "base.json", {**ernie, "hidden_size": heads * 64, "num_attention_heads": heads})
    refused = rf"^{path}: hidden_size is {heads * 64}, but the text tower of .* has {width} \(another model's"
    with pytest.raises(CheckpointError, match=refused):
        load_pdparams(paddle_ref / "model.pdparams", text_config=path)
    path = _write(tmp_path / "heads.json", {**ernie, "num_attention_heads": heads})
    with pytest.raises(CheckpointError, match=rf"text width {width} is not divisible by {heads} heads$"):
        load_pdparams(paddle_ref / "model.pdparams", text_config=path)


def test_heads_given_twice_must_agree() -> None:
    assert ernie_heads({"num_attention_heads": 12}, None, "e.json") == 12
    assert ernie_heads({"num_attention_heads": 12}, 12, "e.json") == 12
    disagree = r"^e\.json: num_attention_heads is 12, but --text-heads says 6$"
    with pytest.raises(CheckpointError, match=disagree):
        ernie_heads({"num_attention_heads": 12}, 6, "e.json")
    with pytest.raises(CheckpointError, match=r"^e\.json: no num_attention_heads \(not an ERNIE config"):
        ernie_heads({"text": {"num_attention_heads": 12}}, None, "e.json")
    for bad in (None, 0, 2.5, True, "12"):
        with pytest.raises(CheckpointError, match=r"^e\.json: num_attention_heads must be a positive int"):
            ernie_heads({"num_attention_heads": bad}, None, "e.json")


def test_an_unsupported_activation_or_dropout_is_refused() -> None:
    text = TextConfig(vocab_size=10, width=8, layers=1, heads=2, intermediate_size=16,
                      max_position_embeddings=4)
    with pytest.raises(CheckpointError, match=r"^e\.json: hidden_act 'relu' is not supported"):
        with_ernie_config(text, {"hidden_act": "relu"}, "e.json", "m.pdparams")
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        for bad in (1, 1.0, 1.5, -0.1, "0.1", None):
            with pytest.raises(CheckpointError, match=rf"^e\.json: {key} must be a number in \[0, 1\), got"):
                with_ernie_config(text, {key: bad}, "e.json", "m.pdparams")
    kept = with_ernie_config(text, {"hidden_act": "gelu"}, "e.json", "m.pdparams")
    assert kept == text  # keys it leaves out keep the weights' sizes and the default rates


def test_an_unreadable_config_is_one_line_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"absent\.json: cannot read the ERNIE config \(No such file"):
        read_ernie_config(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{\"hidden_size\": ")
    with pytest.raises(CheckpointError, match=r"broken\.json: not a JSON ERNIE config \(Expecting value"):
        read_ernie_config(broken)
    with pytest.raises(CheckpointError, match=r"list\.json: not a JSON ERNIE config \(a list, not an object"):
        read_ernie_config(_write(tmp_path / "list.json", [1, 2]))
