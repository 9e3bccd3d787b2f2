from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ernievil2_train.models import DualEncoderConfig, create_model
from ernievil2_train.models.dual_encoder import float32_or_wider
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_float32_or_wider(dtype: torch.dtype) -> None:
    x = torch.tensor([0.1, -3.5, 1e-3]).to(dtype)
    out = float32_or_wider(x)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(out, x.to(out.dtype))


def test_under_autocast_both_towers_give_float32_normalised_embeddings() -> None:
    """The text tower's pooler output is bf16 under autocast, the image tower's final norm float32: their
    product failed on the dtype mismatch, and the text side was normalised in bf16."""
    model = tiny_model().eval()
    pixels, ids = torch.randn(2, 3, 32, 32), torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        image, text = model.encode_image(pixels, normalize=True), model.encode_text(ids, normalize=True)
    assert image.dtype == text.dtype == torch.float32
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    assert (image @ text.T).shape == (2, 2)


@pytest.mark.parametrize(("pixels", "error", "message"), [
    ([[0.0]], TypeError, r"^pixel_values: a float tensor \[B, 3, H, W\], got list$"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), ValueError,
     r"^pixel_values: torch.uint8 pixels; normalise"),
    (torch.zeros(3, 32, 32), ValueError, r"^pixel_values: shape \[3, 32, 32\], expected \[B, 3, H, W\]$"),
    (torch.zeros(1, 1, 32, 32), ValueError, r"^pixel_values: shape \[1, 1, 32, 32\], expected"),
])
def test_pixels_that_are_not_a_normalised_image_batch_are_refused(pixels, error, message) -> None:
    with pytest.raises(error, match=message):
        tiny_model().encode_image(pixels)


@pytest.mark.parametrize(("ids", "error", "message"), [
    (["一只猫"], TypeError,
     r"^input_ids: an integer tensor \[B, L\] \(the tokenizer's 'input_ids'\), got list$"),
    (torch.ones(1, 4), ValueError, r"^input_ids: torch.float32 values, expected token ids"),
    (torch.ones(4, dtype=torch.long), ValueError, r"^input_ids: shape \[4\], expected \[B, L\]$"),
    (torch.ones(1, TINY["text"]["max_position_embeddings"] + 1, dtype=torch.long), ValueError,
     r"tokens per row, more than the model's \d+ text positions"),
])
def test_ids_that_are_not_a_token_batch_the_model_can_place_are_refused(ids, error, message) -> None:
    with pytest.raises(error, match=message):
        tiny_model().encode_text(ids)


def test_an_empty_batch_gives_no_embedding() -> None:
    model = tiny_model()
    assert model.encode_image(torch.zeros(0, 3, 32, 32), normalize=True).shape == (0, model.embed_dim)
    assert model.encode_text(torch.zeros(0, 4, dtype=torch.long)).shape == (0, model.embed_dim)
