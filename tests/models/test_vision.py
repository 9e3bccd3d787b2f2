from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ernievil2_train.models import VisionConfig, create_vision_tower


def _tower() -> VisionTransformer:
    torch.manual_seed(0)
    return create_vision_tower(VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2)).eval()


def test_architecture_matches_official_vit() -> None:
    vit = _tower()
    assert isinstance(vit, VisionTransformer)
    assert vit.patch_embed.proj.bias is None
    assert isinstance(vit.norm_pre, nn.LayerNorm) and vit.norm_pre.eps == 1e-6
    assert isinstance(vit.norm, nn.LayerNorm) and vit.norm.eps == 1e-6
    assert isinstance(vit.fc_norm, nn.Identity) and isinstance(vit.head, nn.Identity)
    assert vit.cls_token is not None and vit.pos_embed.shape == (1, 1 + 16, 32)
    assert vit.blocks[0].attn.qkv.bias is not None
    x = torch.linspace(-3, 3, 11)
    torch.testing.assert_close(vit.blocks[0].mlp.act(x), x * torch.sigmoid(1.702 * x))


def test_output_is_normed_cls_token() -> None:
    vit = _tower()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = vit.forward_features(pixels)
        out = vit(pixels)
        manual = vit.norm(vit.blocks(vit.norm_pre(vit._pos_embed(vit.patch_embed(pixels)))))
    assert out.shape == (2, 32)
    torch.testing.assert_close(out, tokens[:, 0])
    torch.testing.assert_close(tokens, manual)


def test_config_validation_and_round_trip() -> None:
    cfg = VisionConfig(image_size=64, patch_size=16, width=48, layers=1, heads=3, mlp_ratio=2.0)
    assert VisionConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="patch_size"):
        VisionConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="heads"):
        VisionConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="unknown vision config field"):
        VisionConfig.from_dict({"widht": 3})


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("heads", 0, "vision.heads must be a positive integer, got 0"),
        ("layers", "two", "vision.layers must be a positive integer, got 'two'"),
        ("width", -48, "vision.width must be a positive integer, got -48"),
        ("patch_size", 16.0, "vision.patch_size must be a positive integer, got 16.0"),
        ("image_size", True, "vision.image_size must be a positive integer, got True"),
        ("mlp_ratio", 0, "vision.mlp_ratio must be positive, got 0.0"),
        ("mlp_ratio", float("nan"), "vision.mlp_ratio must be a finite number, got nan"),
        ("drop_path_rate", 1.0, "vision.drop_path_rate must be in [0, 1), got 1.0"),
        ("drop_path_rate", None, "vision.drop_path_rate must be a finite number, got None"),
    ],
)
def test_invalid_numbers_name_the_field(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError) as info:
        VisionConfig.from_dict({"image_size": 64, "patch_size": 16, "width": 48, "heads": 3, field: value})
    assert str(info.value) == match


def test_whole_numbers_are_accepted_as_floats() -> None:
    cfg = VisionConfig.from_dict({"mlp_ratio": 2, "drop_path_rate": 0})
    assert (cfg.mlp_ratio, cfg.drop_path_rate) == (2.0, 0.0) and isinstance(cfg.mlp_ratio, float)
    with pytest.raises(ValueError, match="vision config must be a mapping of fields, got list"):
        VisionConfig.from_dict([1, 2])


def test_linear_patch_embed_equals_the_convolution() -> None:
    torch.manual_seed(0)
    tower = create_vision_tower(VisionConfig(image_size=32, patch_size=8, width=16, layers=1, heads=2))
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    embed = tower.patch_embed.double()
    conv = F.conv2d(pixels, embed.proj.weight, embed.proj.bias, stride=8).flatten(2).transpose(1, 2)
    torch.testing.assert_close(embed(pixels), conv, atol=1e-12, rtol=0)
