"""build_model: from scratch, from a checkpoint folder, and with tower weights from local files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ernievil2_train.checkpoints.io import save_pretrained
from ernievil2_train.config_checks import ConfigError
from ernievil2_train.initialize import build_model
from tests.training_helpers import tiny_model

TINY = {
    "vision": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "heads": 2},
    "text": {"vocab_size": 64, "width": 32, "layers": 1, "heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 32},
}


def test_from_config_and_preset_overrides():
    model = build_model(config=OmegaConf.create(TINY))
    assert model.training and model.embed_dim == 32
    assert model.logit_scale.item() == pytest.approx(2.65926)
    small_base = build_model(preset="ernie_vil2_base", config=OmegaConf.create(
        {"vision": {"layers": 1, "image_size": 32}, "text": {"layers": 1, "vocab_size": 64}}))
    assert small_base.config.vision.width == 768 and small_base.config.vision.layers == 1
    assert small_base.config.text.heads == 12


def test_from_checkpoint_keeps_weights_and_temperature(tmp_path):
    source = tiny_model(seed=3)
    with torch.no_grad():
        source.logit_scale.fill_(2.3)
    save_pretrained(source, tmp_path / "ckpt")
    model = build_model(checkpoint=str(tmp_path / "ckpt"))
    assert model.training and model.logit_scale.item() == pytest.approx(2.3)
    for (name, a), b in zip(source.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_tower_weights_from_files(tmp_path, suffix):
    donor = tiny_model(seed=7)
    vision = {f"vision.{k}": v for k, v in donor.vision.state_dict().items()}  # prefixed keys are accepted
    text = {k: v.clone() for k, v in donor.text.state_dict().items()}  # tower-relative keys too
    paths = tmp_path / f"vision{suffix}", tmp_path / f"text{suffix}"
    for path, state in zip(paths, (vision, text), strict=True):
        save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    model = build_model(config=_config_of(donor), vision_weights=str(paths[0]), text_weights=str(paths[1]),
                        logit_scale=3.0)
    for name, value in donor.state_dict().items():
        if name != "logit_scale":
            assert torch.equal(model.state_dict()[name], value), name
    assert model.logit_scale.item() == 3.0


def _config_of(model) -> dict:
    return model.config.to_dict()


def test_missing_tower_keys_name_file_and_keys(tmp_path):
    state = tiny_model().vision.state_dict()
    del state["norm.weight"]
    path = tmp_path / "vision.safetensors"
    save_file(state, str(path))
    expected = r"model.vision_weights.*vision.safetensors.*missing \[norm.weight\]"
    with pytest.raises(ConfigError, match=expected):
        build_model(config=_config_of(tiny_model()), vision_weights=str(path))
    with pytest.raises(ConfigError, match="weight file not found"):
        build_model(config=TINY, text_weights=str(tmp_path / "nope.pt"))


def test_source_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"set one of model\.preset"):
        build_model()
    with pytest.raises(ConfigError, match=r"excludes 'model\.preset'"):
        build_model(preset="ernie_vil2_base", checkpoint=str(tmp_path))
    with pytest.raises(ConfigError, match="checkpoint folder not found"):
        build_model(checkpoint=str(tmp_path / "missing"))
    paddle = tmp_path / "model.pdparams"
    paddle.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^config key 'model.checkpoint': .*model\.pdparams is a Paddle "
                                          r"checkpoint file: convert it into a checkpoint folder first"):
        build_model(checkpoint=str(paddle))



def test_an_unreadable_weight_file_is_one_line_naming_key_and_file(tmp_path):
    """A pickle torch's safe loader refuses (a Paddle checkpoint, say) gets a multi-line error from torch:
    only its first sentence is kept, after the key and the file."""
    pickled = tmp_path / "model.pdparams"
    torch.save({"w": torch.zeros(2), "step": np.int64(3)}, pickled)  # a numpy scalar: refused by weights_only
    with pytest.raises(ConfigError) as refused:
        build_model(config=TINY, text_weights=str(pickled))
    message = str(refused.value)
    assert message.startswith(f"config key 'model.text_weights': cannot read {pickled} (UnpicklingError: ")
    assert "\n" not in message


def _hf_ernie(cls_name: str, text: dict) -> torch.nn.Module:
    """An ERNIE 3.0-style transformers model of the text tower's sizes: 4 token types, 3 task types."""
    import transformers

    from ernievil2_train.models.text import TextConfig, ernie_config

    config = ernie_config(TextConfig.from_dict(text))
    config.type_vocab_size, config.use_task_id, config.task_type_vocab_size = 4, True, 3
    torch.manual_seed(11)
    return getattr(transformers, cls_name)(config).eval()


@pytest.mark.parametrize(("cls_name", "prefix"), [("ErnieForPreTraining", "ernie"), ("ErnieModel", None)])
def test_transformers_ernie_weights_give_the_same_encoder(tmp_path, caplog, cls_name, prefix):
    """A transformers ERNIE file loads with its heads left out and its type tables folded into the positions:
    the text tower then computes what the transformers model computes with type ids 0."""
    config = _config_of(tiny_model())
    source = _hf_ernie(cls_name, config["text"])
    path = tmp_path / "ernie.safetensors"
    save_file({k: v.clone().contiguous() for k, v in source.state_dict().items()}, str(path))  # untied
    with caplog.at_level("INFO", logger="ernievil2_train.initialize"):
        model = build_model(config=config, text_weights=str(path)).eval()
    ids = torch.randint(4, config["text"]["vocab_size"], (3, 10), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1
    encoder = getattr(source, prefix) if prefix else source
    with torch.no_grad():
        expected = encoder(input_ids=ids)
        got = model.text(ids)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-5, rtol=1e-5)
    message = caplog.text
    assert "model.text_weights: loaded all" in message and "token_type_embeddings" in message
    assert ("left out cls.predictions" in message) == (prefix is not None)


def test_a_transformers_file_without_the_pooler_is_refused(tmp_path):
    """ErnieForMaskedLM has no pooler, whose output is the text embedding: it is not left at random init."""
    config = _config_of(tiny_model())
    path = tmp_path / "mlm.pt"
    torch.save(_hf_ernie("ErnieForMaskedLM", config["text"]).state_dict(), path)
    expected = r"model.text_weights.*missing \[ernie.pooler.dense.bias, ernie.pooler.dense.weight\]"
    with pytest.raises(ConfigError, match=expected):
        build_model(config=config, text_weights=str(path))


def test_a_timm_checkpoint_loads_without_its_head(tmp_path):
    donor = tiny_model(seed=5)
    state = dict(donor.vision.state_dict())
    state["head.weight"], state["head.bias"] = torch.randn(10, 32), torch.randn(10)  # a classifier
    path = tmp_path / "vit.safetensors"
    save_file(state, str(path))
    model = build_model(config=_config_of(donor), vision_weights=str(path))
    for name, value in donor.vision.state_dict().items():
        assert torch.equal(model.vision.state_dict()[name], value), name
    state["fc_norm.weight"] = torch.ones(32)  # anything else the tower has no place for is refused
    save_file(state, str(path))
    with pytest.raises(ConfigError, match=r"model.vision_weights.*unexpected \[fc_norm.weight\]"):
        build_model(config=_config_of(donor), vision_weights=str(path))
