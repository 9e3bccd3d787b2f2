"""Feature-cache accumulation: same loss and gradients as one pass over the whole batch."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import pytest
import torch

from ernievil2_train.accumulation import RngState, split_batch
from ernievil2_train.module import PER_SAMPLE_KEYS, ErnieVil2Module
from tests.training_helpers import ALL_PAIRS, make_batch, tiny_model

LOSS = {"weights": ALL_PAIRS, "multi_positive": True, "temperature": "per_pair", "temperature_init": 3.0}


def _module(k: int, dropout: float = 0.0, freeze: str | None = None, **loss) -> ErnieVil2Module:
    frozen = {f"freeze_{freeze}": True} if freeze else {}
    return ErnieVil2Module(tiny_model(seed=0, dropout=dropout, dtype=torch.float64), loss={**LOSS, **loss},
                           accumulate_microbatches=k, **frozen).double()


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[n] - b[n]).abs().max().item() for n in a)


def _cached(module: ErnieVil2Module, batch) -> dict[str, torch.Tensor]:
    return module.feature_cache_losses(batch, lambda t: t.backward(), nullcontext)


@pytest.mark.parametrize("k", [2, 4])
def test_microbatches_match_full_batch(k):
    batch = make_batch(8, seed=3, dtype=torch.float64)
    full = _module(1)
    expected = full(batch)
    expected["loss"].backward()
    cached = _module(k)
    out = _cached(cached, batch)
    for key in expected:
        torch.testing.assert_close(out[key], expected[key].detach(), atol=1e-12, rtol=0)
    diff = _max_diff(_grads(cached), _grads(full))
    print(f"k={k}: max |grad diff| = {diff:.2e}")
    assert diff < 1e-10
    assert len(_grads(full)) == sum(p.requires_grad for p in full.parameters())


@pytest.mark.parametrize(("tower", "weights"), [
    ("vision", {"image_caption": 1.0, "image_tags": 0.5, "text_text": 0.75}),
    ("text", {"image_caption": 1.0, "image_tags": 0.5, "image_image": 0.25}),
])
def test_a_frozen_tower_is_encoded_once_and_gradients_match(tower: str, weights: dict[str, float]) -> None:
    """LiT-style: the frozen tower's features come from the cache; only the trained tower is re-encoded."""
    batch = make_batch(8, seed=4, dtype=torch.float64)
    full = _module(1, freeze=tower, weights=weights)
    full(batch)["loss"].backward()
    cached = _module(4, freeze=tower, weights=weights)
    calls = {"vision": 0, "text": 0}

    def count(name: str) -> None:
        calls[name] += 1

    for name in calls:
        getattr(cached.model, name).register_forward_hook(lambda *_, name=name: count(name))
    _cached(cached, batch)
    trained = "text" if tower == "vision" else "vision"
    assert calls == {tower: 4, trained: 8}
    assert _max_diff(_grads(cached), _grads(full)) < 1e-10


@pytest.mark.parametrize("temperature", ["shared", "fixed"])
def test_microbatch_without_tags_matches_full_batch(temperature):
    """Micro-batches with 0, 1, 2 and 1 tagged samples, and the other temperature modes: the loss terms,
    accuracies and every gradient, temperatures included, equal one pass."""
    batch = make_batch(8, seed=5, dtype=torch.float64)
    batch["has_tags"] = torch.tensor([0, 0, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    batch["tag_ids"] = torch.where(batch["has_tags"][:, None], batch["tag_ids"], 0)
    full = _module(1, temperature=temperature)
    expected = full(batch)
    expected["loss"].backward()
    cached = _module(4, temperature=temperature)
    out = _cached(cached, batch)
    for key in expected:
        torch.testing.assert_close(out[key], expected[key].detach(), atol=1e-12, rtol=0)
    expected_grads = _grads(full)
    assert ("model.logit_scale" in expected_grads) == (temperature == "shared")
    assert _max_diff(_grads(cached), expected_grads) < 1e-10


def _direct_microbatch_grads(module: ErnieVil2Module, batch, k: int) -> tuple[dict, torch.Tensor]:
    """Reference with dropout: encode each micro-batch WITH grad in the same RNG order, one backward."""
    parts = [module._encode(mb) for mb in split_batch(batch, k, PER_SAMPLE_KEYS)]
    feats = {n: torch.cat([p[n] for p in parts]) for n in parts[0]}
    out = module._losses(feats, batch)
    out["loss"].backward()
    return _grads(module), out["loss"].detach()


def test_rng_replay_reproduces_dropout_masks(monkeypatch):
    batch = make_batch(8, seed=4, dtype=torch.float64)
    torch.manual_seed(123)
    reference, ref_loss = _direct_microbatch_grads(_module(2, dropout=0.3), batch, 2)
    torch.manual_seed(123)
    cached = _module(2, dropout=0.3)
    out = _cached(cached, batch)
    torch.testing.assert_close(out["loss"], ref_loss, atol=1e-12, rtol=0)
    diff = _max_diff(_grads(cached), reference)
    print(f"dropout 0.3, RNG replayed: max |grad diff| = {diff:.2e}")
    assert diff < 1e-10

    # negative control: without the replay the re-encoding draws new masks and the gradients are wrong
    @contextmanager
    def no_replay(self):
        yield

    monkeypatch.setattr(RngState, "replay", no_replay)
    torch.manual_seed(123)
    broken = _module(2, dropout=0.3)
    _cached(broken, batch)
    assert _max_diff(_grads(broken), reference) > 1e-4


def test_rng_state_replay_and_restore():
    state = RngState.capture(torch.device("cpu"))
    first = torch.rand(5)
    after = torch.get_rng_state()
    with state.replay():
        again = torch.rand(5)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    assert torch.equal(torch.get_rng_state(), after)


def test_split_batch_keeps_per_sample_keys_only():
    batch = make_batch(8)
    batch["skipped"] = torch.tensor([1, 0, 2])
    parts = split_batch(batch, 4, PER_SAMPLE_KEYS)
    assert len(parts) == 4 and all("skipped" not in p for p in parts)
    assert all(p["image"].shape[0] == 2 for p in parts)
    torch.testing.assert_close(torch.cat([p["caption_ids"] for p in parts]), batch["caption_ids"])
    with pytest.raises(ValueError, match="not divisible by accumulate_microbatches=3"):
        split_batch(batch, 3, PER_SAMPLE_KEYS)
