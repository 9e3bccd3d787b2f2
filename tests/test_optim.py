"""Parameter groups (decay rules, per-tower lr, layer decay) and the warmup + cosine schedule."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

from ernievil2_train.config_checks import ConfigError
from ernievil2_train.models import create_model
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


@pytest.mark.parametrize(("factory", "lr", "weight_decay"), [
    (functools.partial(torch.optim.SGD, lr=0.1, weight_decay=0.5), 0.1, 0.5),
    (lambda params: torch.optim.SGD(params, lr=0.2, weight_decay=0.3), 0.2, 0.3),  # not a partial
    (torch.optim.AdamW, 1e-3, 1e-2),  # the class: its own defaults
])
def test_the_groups_take_the_lr_and_weight_decay_the_factory_sets(factory, lr, weight_decay):
    groups = _groups(optimizer=factory)
    assert groups["vision:blocks.1.mlp.fc1.weight"]["lr"] == pytest.approx(lr)
    assert groups["vision:blocks.1.mlp.fc1.weight"]["weight_decay"] == pytest.approx(weight_decay)
    assert groups["text:ernie.pooler.dense.weight"]["weight_decay"] == pytest.approx(weight_decay)
    assert groups["vision:norm.bias"]["weight_decay"] == 0.0


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


@pytest.mark.parametrize("layer_decay", [1.0, 0.5])
def test_group_names_say_which_part_of_a_tower_they_hold(layer_decay: float) -> None:
    groups = _groups(layer_decay=layer_decay)
    names = {key: group["name"] for key, group in groups.items()}
    if layer_decay == 1.0:
        assert names["vision:blocks.0.mlp.fc1.weight"] == "vision/decay"
        assert names["text:ernie.embeddings.LayerNorm.bias"] == "text/no_decay"
    else:
        assert names["vision:patch_embed.proj.weight"] == "vision/stem/decay"
        assert names["vision:blocks.0.mlp.fc1.weight"] == "vision/block0/decay"
        assert names["text:ernie.encoder.layer.1.output.dense.bias"] == "text/block1/no_decay"
        assert names["text:ernie.pooler.dense.weight"] == "text/head/decay"
    assert names["temperature:logit_scale"] == "temperature/no_decay"


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
    ({"warmup_ratio": "abc"}, "scheduler.warmup_ratio must be a finite number, got 'abc'"),
    ({"min_lr_ratio": None}, "scheduler.min_lr_ratio must be a finite number, got None"),
    ({"warmup_steps": -1}, "scheduler.warmup_steps must be a positive integer, got -1"),
    ({"total_steps": -5}, "scheduler.total_steps must be a positive integer, got -5"),
    ({"total_steps": 0}, "scheduler.total_steps must be a positive integer, got 0"),
])
def test_schedule_config_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        ScheduleConfig.from_any(cfg)


def _decay_by_name(module: ErnieVil2Module) -> dict[str, tuple[float, float]]:
    return {f"{g['name'].split('/')[0]}:{n}": (g["lr"], g["weight_decay"])
            for g in module.param_groups() for n in g["param_names"]}


def test_flattened_fsdp_parameters_keep_their_groups():
    """FSDP (`use_orig_params`) leaves each parameter as a flat 1-dim view, marked `_fsdp_flattened`: the
    groups (decay and lr) must be those of the unwrapped model, not "no decay" for every weight matrix."""
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1)
    plain = ErnieVil2Module(tiny_model(), loss={"weights": ALL_PAIRS}, optimizer=optimizer, layer_decay=0.7)
    flat = ErnieVil2Module(tiny_model(), loss={"weights": ALL_PAIRS}, optimizer=optimizer, layer_decay=0.7)
    for param in flat.parameters():
        param.data = param.data.flatten()
        param._fsdp_flattened = True
    expected = _decay_by_name(plain)
    assert _decay_by_name(flat) == expected
    assert expected["vision:blocks.0.attn.qkv.weight"][1] == 0.1
    assert expected["text:ernie.pooler.dense.weight"][1] == 0.1


@pytest.mark.parametrize("preset", ["ernie_vil2_base", "ernie_vil2_large"])
def test_decay_rule_by_name_matches_the_shapes_of_both_presets(preset):
    """The name rule alone (all FSDP leaves) gives the groups the shapes give: every 0/1-dim parameter of the
    presets is named as a bias, a norm weight or a temperature."""
    with torch.device("meta"):
        model = create_model(preset, vision={"layers": 2}, text={"layers": 2})
    for name, param in model.named_parameters():
        flattened = torch.nn.Parameter(torch.empty(0, device="meta"))
        flattened._fsdp_flattened = True
        assert no_weight_decay(name, flattened) == no_weight_decay(name, param), name


def test_layer_ids_see_through_fsdp_and_checkpoint_wrappers():
    assert layer_id("blocks.3._fsdp_wrapped_module.attn.qkv.weight", 12) == 4
    wrapped = "ernie.encoder.layer.5._fsdp_wrapped_module._checkpoint_wrapped_module.output.dense.weight"
    assert layer_id(wrapped, 12) == 6
    assert layer_id("ernie.encoder.layer.0.attention.output.LayerNorm.weight", 12) == 1
    assert layer_id("norm.weight", 12) == 13 and layer_id("norm_pre.weight", 12) == 0


def test_warmup_as_long_as_the_run_is_refused():
    with pytest.raises(ConfigError, match=r"'module\.scheduler\.warmup_steps': 100 warmup steps, but the run "
                                          r"has 100 optimizer steps"):
        ScheduleConfig(warmup_steps=100).warmup(100)
    assert ScheduleConfig(warmup_steps=99).warmup(100) == 99
    assert ScheduleConfig(warmup_ratio=0.9).warmup(1) == 0  # a ratio never covers the whole run
    assert ScheduleConfig(warmup_ratio=0.99).warmup(10) == 9


def test_warmup_longer_than_the_trainer_run_stops_before_training():
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from tests.training_helpers import make_batch

    batch = make_batch(8)
    samples = [{k: v[i] for k, v in batch.items()} for i in range(8)]
    module = ErnieVil2Module(tiny_model(), loss={"weights": ALL_PAIRS}, scheduler={"warmup_steps": 5})
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ConfigError, match="5 warmup steps, but the run has 3 optimizer steps"):
        trainer.fit(module, train_dataloaders=DataLoader(samples, batch_size=4))
    assert trainer.global_step == 0
