"""build_model: from scratch, from a checkpoint folder, and with tower weights from local files."""

from __future__ import annotations

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
    expected = r"model.vision_weights.*vision.safetensors.*missing \['norm.weight'\]"
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
