from __future__ import annotations

import pytest
import torch
from torch import nn

from ernievil2_train.models import TextConfig, TextTower, trim_padding
from ernievil2_train.models.text import key_mask, padded_length

CFG = TextConfig(vocab_size=50, width=32, layers=2, heads=2, intermediate_size=64, max_position_embeddings=16)


def _tower() -> TextTower:
    torch.manual_seed(0)
    return TextTower(CFG).eval()


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("heads", 0, "text.heads must be a positive integer, got 0"),
        ("layers", "two", "text.layers must be a positive integer, got 'two'"),
        ("width", -32, "text.width must be a positive integer, got -32"),
        ("vocab_size", False, "text.vocab_size must be a positive integer, got False"),
        ("intermediate_size", 0, "text.intermediate_size must be a positive integer, got 0"),
        ("max_position_embeddings", 0, "text.max_position_embeddings must be a positive integer, got 0"),
        ("dropout", -0.1, "text.dropout must be in [0, 1), got -0.1"),
        ("attention_dropout", "0.1", "text.attention_dropout must be a finite number, got '0.1'"),
    ],
)
def test_invalid_numbers_name_the_field(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError) as info:
        TextConfig.from_dict({**CFG.to_dict(), field: value})
    assert str(info.value) == match


def test_config_of_the_ernie_model() -> None:
    cfg = _tower().ernie.config
    assert cfg.hidden_act == "gelu" and cfg.layer_norm_eps == 1e-5 and not cfg.use_task_id
    assert cfg.is_decoder is False and cfg._attn_implementation == "sdpa"
    emb = _tower().ernie.embeddings
    assert emb.LayerNorm.eps == 1e-5 and not hasattr(emb, "task_type_embeddings")


def test_token_type_contributes_nothing_and_is_not_a_parameter() -> None:
    tower = _tower()
    assert not any("token_type" in name for name in tower.state_dict())
    assert not any("token_type" in name for name, _ in tower.named_parameters())
    emb = tower.ernie.embeddings
    ids = torch.tensor([[1, 7, 9, 2, 0]])
    positions = torch.arange(5)[None]
    with torch.no_grad():
        expected = emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings(positions))
        for types in (torch.zeros_like(ids), torch.ones_like(ids)):
            got = emb(input_ids=ids, token_type_ids=types, position_ids=positions)
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_the_tower_has_no_buffers() -> None:
    """Nothing for DDP to broadcast before a forward: a validation forward is then no collective, and a rank
    without validation batches cannot leave the others waiting in one."""
    assert list(_tower().named_buffers()) == []


def test_pooled_is_tanh_linear_of_cls_and_pads_are_masked() -> None:
    tower = _tower()
    ids = torch.tensor([[1, 7, 9, 2, 0, 0, 0], [1, 4, 2, 0, 0, 0, 0]])
    with torch.no_grad():
        out = tower(ids)
        dense = tower.ernie.pooler.dense
        torch.testing.assert_close(out.pooler_output, torch.tanh(dense(out.last_hidden_state[:, 0])))
        short = tower(ids[:, :4]).pooler_output
        other_pads = tower(torch.where(ids == 0, torch.zeros_like(ids), ids)).pooler_output
    torch.testing.assert_close(out.pooler_output, short, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.pooler_output, other_pads)


def test_sdpa_key_mask_matches_eager_attention() -> None:
    tower = _tower()
    ids = torch.tensor([[1, 7, 9, 2, 0, 0, 0], [1, 4, 2, 0, 0, 0, 0], [1, 4, 5, 6, 7, 8, 2]])
    with torch.no_grad():
        sdpa = tower(ids).last_hidden_state
        tower.ernie.config._attn_implementation = "eager"
        eager = tower(ids).last_hidden_state
    real = ids != 0
    torch.testing.assert_close(sdpa[real], eager[real], atol=1e-6, rtol=1e-5)


def test_an_all_pad_row_attends_its_first_key_on_every_kernel() -> None:
    ids = torch.tensor([[1, 7, 2, 0], [0, 0, 0, 0]])  # the second: a sample without tags
    assert key_mask(ids).tolist() == [[True, True, True, False], [True, False, False, False]]
    tower = _tower().train()
    sdpa = tower(ids)
    sdpa.pooler_output.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in tower.parameters() if p.grad is not None)
    tower.eval()
    with torch.no_grad():
        sdpa = tower(ids).last_hidden_state
        tower.ernie.config._attn_implementation = "eager"
        eager = tower(ids).last_hidden_state
    torch.testing.assert_close(sdpa, eager, atol=1e-6, rtol=1e-5)


def test_padded_length_rounds_up_and_caps() -> None:
    assert padded_length(torch.tensor([[1, 2] + [0] * 14])) == 8
    assert padded_length(torch.tensor([[1] + [5] * 8 + [2] + [0] * 6])) == 16
    assert padded_length(torch.tensor([[1] + [5] * 10 + [2]])) == 12
    assert padded_length(torch.zeros(2, 12, dtype=torch.long)) == 8
    assert padded_length(torch.tensor([[1, 5, 2, 0]]), multiple=1) == 3
    short, long = torch.tensor([[1, 2] + [0] * 30]), torch.tensor([[1] + [5] * 17 + [2] + [0] * 13])
    assert padded_length(short, long) == padded_length(long, short) == 24


def test_trim_padding_keeps_the_encoding() -> None:
    tower = _tower()
    ids = torch.tensor([[1, 5, 0, 6, 2] + [0] * 11, [1, 7, 2] + [0] * 13])
    trimmed = trim_padding(ids)
    assert trimmed.shape == (2, 8)  # the last real token is column 4; rounded up to a multiple of 8
    assert torch.equal(trimmed, ids[:, :8])
    with torch.no_grad():
        short, full = tower(trimmed).pooler_output, tower(ids).pooler_output
    torch.testing.assert_close(short, full, atol=1e-6, rtol=1e-5)


def _first(out: torch.Tensor | tuple) -> torch.Tensor:
    """transformers < 5 returns tuples from layers, >= 5 tensors."""
    return out[0] if isinstance(out, tuple) else out


def test_post_ln_exact_gelu_layer() -> None:
    tower = _tower()
    layer = tower.ernie.encoder.layer[0]
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        attn_out = _first(layer.attention(x))
        ffn = layer.output.dense(nn.functional.gelu(layer.intermediate.dense(attn_out)))
        expected = layer.output.LayerNorm(attn_out + ffn)
        torch.testing.assert_close(_first(layer(x)), expected)


def test_gradient_checkpointing_toggles() -> None:
    tower = _tower()
    ids = torch.tensor([[1, 7, 9, 2, 0], [1, 4, 2, 0, 0]])
    tower.train()
    torch.manual_seed(1)
    tower(ids).pooler_output.sum().backward()
    plain = [p.grad.clone() for p in tower.parameters()]
    tower.zero_grad()
    tower.set_grad_checkpointing(True)
    assert tower.grad_checkpointing
    torch.manual_seed(1)
    tower(ids).pooler_output.sum().backward()
    for a, b in zip(plain, [p.grad for p in tower.parameters()], strict=True):
        torch.testing.assert_close(a, b)
    tower.set_grad_checkpointing(False)
    assert not tower.grad_checkpointing


@pytest.mark.slow
def test_compiled_tower_takes_every_trimmed_length():
    """Batches trimmed to different lengths: a static graph, then one with a dynamic length; eager outputs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = _tower()
    compiled = _tower()
    compiled.compile()
    generator = torch.Generator().manual_seed(0)
    for length in (8, 16, 8, 16):
        ids = torch.randint(4, CFG.vocab_size, (3, length), generator=generator)
        ids[0, length // 2 :] = 0  # one padded row
        with torch.no_grad():
            expected = eager(ids).pooler_output
            got = compiled(ids).pooler_output
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()
