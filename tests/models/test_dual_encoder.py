from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ernievil2_train.models import DualEncoderConfig, create_model
from tests.models.tiny import TINY, tiny_model


def test_logit_scale_is_a_one_element_log_parameter() -> None:
    model = tiny_model()
    # one element, as the official temperature_b, and shardable by FSDP (which refuses 0-dim parameters)
    assert isinstance(model.logit_scale, torch.nn.Parameter) and model.logit_scale.shape == (1,)
    assert math.isclose(model.logit_scale.item(), 2.65926, rel_tol=1e-6)
    assert model.embed_dim == TINY["vision"]["width"]
    assert math.isclose(tiny_model(logit_scale_init=2.3).logit_scale.item(), 2.3, rel_tol=1e-6)


def test_width_mismatch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"vision.width \(32\) must equal text.width \(48\)"):
        create_model(TINY, text={"width": 48})


def test_encoders_shapes_and_normalization() -> None:
    torch.manual_seed(0)
    model = tiny_model()
    pixels = torch.randn(3, 3, 32, 32)
    ids = torch.tensor([[1, 5, 6, 2, 0, 0, 0, 0], [1, 7, 2, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        img = model.encode_image(pixels)
        txt = model.encode_text(ids)
        img_n, txt_n, scale = model(pixels, ids)
    assert img.shape == (3, model.embed_dim) and txt.shape == (2, model.embed_dim)
    torch.testing.assert_close(model.encode_image(pixels, normalize=True), F.normalize(img, dim=-1))
    torch.testing.assert_close(img_n, F.normalize(img, dim=-1))
    torch.testing.assert_close(txt_n, F.normalize(txt, dim=-1))
    torch.testing.assert_close(scale, model.logit_scale.exp().squeeze(0))  # 0-dim, as the official


def test_grad_checkpointing_reaches_both_towers() -> None:
    model = tiny_model()
    model.set_grad_checkpointing(True)
    assert model.vision.grad_checkpointing and model.text.grad_checkpointing
    model.set_grad_checkpointing(False)
    assert not model.vision.grad_checkpointing and not model.text.grad_checkpointing


def test_config_round_trip() -> None:
    cfg = DualEncoderConfig.from_dict(TINY)
    assert DualEncoderConfig.from_dict(cfg.to_dict()) == cfg
    assert create_model(cfg).config == cfg
    with pytest.raises(ValueError, match="unknown model config field"):
        DualEncoderConfig.from_dict({**TINY, "projection": 3})


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([1, 2], "model config must be a mapping of fields, got list"),
        ({**TINY, "text": None}, "text config must be a mapping of fields, got NoneType"),
        ({**TINY, "logit_scale_init": "high"}, "logit_scale_init must be a finite number, got 'high'"),
        ({**TINY, "logit_scale_init": math.inf}, "logit_scale_init must be a finite number, got inf"),
        ({**TINY, "vision": {**TINY["vision"], "heads": -2}},
         "vision.heads must be a positive integer, got -2"),
    ],
)
def test_invalid_configs_are_value_errors(data: object, match: str) -> None:
    with pytest.raises(ValueError) as info:
        DualEncoderConfig.from_dict(data)
    assert str(info.value) == match


def test_a_zero_dim_logit_scale_of_an_older_checkpoint_loads() -> None:
    model = tiny_model()
    state = {**model.state_dict(), "logit_scale": torch.tensor(3.25)}
    model.load_state_dict(state)
    assert model.logit_scale.shape == (1,) and model.logit_scale.item() == 3.25
    _, _, scale = model(torch.zeros(1, 3, 32, 32), torch.tensor([[1, 5, 2]]))
    assert scale.shape == () and math.isclose(scale.item(), math.exp(3.25), rel_tol=1e-6)
