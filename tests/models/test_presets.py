from __future__ import annotations

import json

import pytest

from ernievil2_train.models import PRESETS, DualEncoderConfig, create_model
from tests.models.tiny import TINY


@pytest.mark.parametrize(
    ("name", "patch", "width", "layers", "heads", "intermediate"),
    [("ernie_vil2_base", 16, 768, 12, 12, 3072), ("ernie_vil2_large", 14, 1024, 24, 16, 4096)],
)
def test_official_presets(
    name: str, patch: int, width: int, layers: int, heads: int, intermediate: int
) -> None:
    cfg = DualEncoderConfig.from_dict(PRESETS[name])
    assert (cfg.vision.image_size, cfg.vision.patch_size) == (224, patch)
    assert (cfg.vision.width, cfg.vision.layers, cfg.vision.heads) == (width, layers, heads)
    assert (cfg.text.width, cfg.text.layers, cfg.text.heads) == (width, layers, heads)
    assert cfg.text.intermediate_size == intermediate
    assert (cfg.text.vocab_size, cfg.text.max_position_embeddings) == (40000, 2048)
    assert cfg.logit_scale_init == 2.65926


def test_presets_fit_the_official_tokenizer(paddle_ref) -> None:
    """Every id of the official vocabulary has an embedding row and every official text length a position."""
    tokenizer = json.loads((paddle_ref / "config.json").read_text())["tokenizer"]
    for preset in PRESETS.values():
        assert preset["text"]["vocab_size"] > tokenizer["max_id"]
        assert preset["text"]["max_position_embeddings"] >= tokenizer["max_text_seqlen"]


def test_create_model_with_overrides() -> None:
    model = create_model("ernie_vil2_base", **{k: dict(v) for k, v in TINY.items()})
    assert model.config.vision.patch_size == TINY["vision"]["patch_size"]
    assert len(model.vision.blocks) == TINY["vision"]["layers"]
    assert len(model.text.ernie.encoder.layer) == TINY["text"]["layers"]


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        create_model("nope")
