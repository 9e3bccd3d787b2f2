"""Parameter groups (decay rules, per-tower lr, layer decay) and the warmup + cosine schedule."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

from ernievil2_train.module import ErnieVil2Module
from ernievil2_train.optim import ScheduleConfig, layer_id, no_weight_decay, warmup_cosine
from tests.training_helpers import ALL_PAIRS, tiny_model


def _groups(**kwargs) -> dict[str, dict]:
    kwargs.setdefault("optimizer", functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1))
    module = ErnieVil2Module(tiny_model(), loss={"weights": ALL_PAIRS}, **kwargs)
    by_param = {}
    for group in module.param_groups():
        for name in group["param_names"]:
            by_param[f"{group['name'].split('/')[0]}:{name}"] = group
    return by_param


def test_no_decay_on_biases_norms_embeddings_and_temperatures():
    groups = _groups()
    no_decay = {
        "vision:cls_token", "vision:pos_embed", "vision:norm_pre.weight", "vision:blocks.0.attn.qkv.bias",
        "vision:norm.weight", "text:ernie.embeddings.word_embeddings.weight",
        "text:ernie.embeddings.position_embeddings.weight",
        "text:ernie.encoder.layer.1.output.LayerNorm.bias",
        "temperature:logit_scale", "temperature:log_scales.text_text",
    }
    decay = {
        "vision:patch_embed.proj.weight", "vision:blocks.1.mlp.fc1.weight",
        "text:ernie.encoder.layer.0.attention.self.query.weight", "text:ernie.pooler.dense.weight",
    }
    for name in no_decay:
        assert groups[name]["weight_decay"] == 0.0, name
    for name in decay:
        assert groups[name]["weight_decay"] == 0.1, name
    module = ErnieVil2Module(tiny_model(), loss={"weights": ALL_PAIRS})
    n_params = sum(p.requires_grad for p in module.parameters())
    assert len(groups) == n_params  # every trainable parameter exactly once


def test_per_tower_learning_rates():
    groups = _groups(vision_lr=2e-4, text_lr=3e-5, temperature_lr=1e-2)
    assert groups["vision:blocks.0.attn.qkv.weight"]["lr"] == pytest.approx(2e-4)
    assert groups["text:ernie.pooler.dense.weight"]["lr"] == pytest.approx(3e-5)
    assert groups["temperature:logit_scale"]["lr"] == pytest.approx(1e-2)
    assert _groups()["vision:norm.bias"]["lr"] == pytest.approx(1e-3)  # the optimizer partial's lr


def test_layer_decay_scales_lr_by_depth():
    groups = _groups(layer_decay=0.5)
    depth = 2 + 1  # tiny towers have 2 blocks; the head is layer 3
    assert groups["vision:norm.weight"]["lr"] == pytest.approx(1e-3)
    assert groups["vision:blocks.1.mlp.fc1.weight"]["lr"] == pytest.approx(1e-3 * 0.5)
    assert groups["vision:blocks.0.mlp.fc1.weight"]["lr"] == pytest.approx(1e-3 * 0.25)
    assert groups["vision:patch_embed.proj.weight"]["lr"] == pytest.approx(1e-3 * 0.5**depth)
    assert groups["text:ernie.embeddings.word_embeddings.weight"]["lr"] == pytest.approx(1e-3 * 0.5**depth)
    assert groups["text:ernie.encoder.layer.1.output.dense.weight"]["lr"] == pytest.approx(1e-3 * 0.5)
    assert groups["text:ernie.pooler.dense.weight"]["lr"] == pytest.approx(1e-3)
    assert groups["temperature:logit_scale"]["lr"] == pytest.approx(1e-3)


def test_layer_id_and_decay_rules():
    assert layer_id("blocks.11.attn.qkv.weight", 12) == 12
    assert layer_id("ernie.encoder.layer.0.output.dense.weight", 12) == 1
    assert layer_id("ernie.embeddings.LayerNorm.weight", 12) == 0
    assert layer_id("ernie.pooler.dense.weight", 12) == 13
    assert no_weight_decay("x.bias", torch.nn.Parameter(torch.zeros(3)))
    assert not no_weight_decay("patch_embed.proj.weight", torch.nn.Parameter(torch.zeros(3, 3, 2, 2)))


def test_warmup_then_cosine_to_min_ratio():
    total, warmup, floor = 100, 10, 0.1
    values = [warmup_cosine(s, total, warmup, floor) for s in range(total + 5)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(values[:10]))  # linear warmup rises
    assert values[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(values[10:101]))  # cosine falls
    assert values[55] == pytest.approx(floor + (1 - floor) * 0.5)  # half way through the cosine
    assert values[100] == pytest.approx(floor) and values[104] == pytest.approx(floor)
    assert warmup_cosine(0, 10, 0, 0.0) == pytest.approx(1.0)
    assert math.isclose(ScheduleConfig(warmup_ratio=0.05).warmup(1000), 50)


@pytest.mark.parametrize("cfg,match", [
    ({"warmup_steps": 5, "warmup_ratio": 0.1}, "not both"),
    ({"min_lr_ratio": 2.0}, "min_lr_ratio"),
    ({"warmup_ratio": 1.0}, "warmup_ratio"),
    ({"warmup": 3}, "unknown scheduler config field"),
])
def test_schedule_config_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        ScheduleConfig.from_any(cfg)
