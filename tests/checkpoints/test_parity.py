"""Converted Paddle checkpoints reproduce every reference output (README tolerances)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ernievil2_train.checkpoints import load_pretrained, save_pretrained
from tests.checkpoints.reference import ATOL, PDPARAMS_FILES, RTOL, convert_reference, load_npz


def _run(model, inputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Every compared output of `model` on the reference inputs (intermediates captured by hooks)."""
    pixels = torch.from_numpy(inputs["pixel_values"])
    ids = torch.from_numpy(inputs["input_ids"])
    vit = model.vision
    captured: dict[str, torch.Tensor] = {}
    hooks = [vit.patch_embed.register_forward_hook(lambda _m, _i, out: captured.__setitem__("patch", out))]
    layers = [vit.norm_pre, *vit.blocks]
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(lambda _m, _i, out, i=i: captured.__setitem__(i, out)))
    with torch.no_grad():
        tokens = vit.forward_features(pixels)
        image = model.encode_image(pixels)
        text = model.text(ids, output_hidden_states=True)
        pooled = model.encode_text(ids)
        k = min(len(pixels), len(ids))
        head = model(pixels[:k], ids[:k])
    for hook in hooks:
        hook.remove()
    return {
        "image_tokens": tokens,
        "image_embeds": image,
        "image_embeds_norm": model.encode_image(pixels, normalize=True).detach(),
        "image_patch_embed": captured["patch"],
        "image_hidden_states": torch.stack([captured[i] for i in range(len(layers))]),
        "text_pooled": pooled,
        "text_pooled_norm": F.normalize(pooled, dim=-1),
        "text_sequence": text.last_hidden_state,
        "text_hidden_states": torch.stack(text.hidden_states),
        "head": head,
    }


@pytest.fixture(scope="module", params=PDPARAMS_FILES)
def converted(request, paddle_ref: Path, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Convert, save as safetensors, reload, and run on the reference inputs."""
    out = tmp_path_factory.mktemp("converted")
    save_pretrained(convert_reference(paddle_ref, request.param), out)
    model = load_pretrained(out)
    inputs = load_npz(paddle_ref / "inputs.npz")
    results = _run(model, inputs)
    results["logit_scale"] = model.logit_scale.detach()
    results["real"] = torch.from_numpy(inputs["input_ids"] != 0)
    return results


@pytest.fixture(scope="module")
def expected(paddle_ref: Path) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v)) for k, v in load_npz(paddle_ref / "outputs.npz").items()}


@pytest.mark.parametrize(
    "key",
    [
        "image_tokens",
        "image_embeds",
        "image_embeds_norm",
        "image_patch_embed",
        "image_hidden_states",
        "text_pooled",
        "text_pooled_norm",
    ],
)
def test_dense_outputs_match(converted, expected, key: str) -> None:
    torch.testing.assert_close(converted[key], expected[key], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("key", ["text_sequence", "text_hidden_states"])
def test_text_token_outputs_match_at_real_tokens(converted, expected, key: str) -> None:
    real = converted["real"]
    got, want = converted[key], expected[key]
    assert got.shape == want.shape
    torch.testing.assert_close(got[..., real, :], want[..., real, :], atol=ATOL, rtol=0)


def test_embedding_layer_output_matches_at_every_position(converted, expected) -> None:
    """The embedding LayerNorm output does not depend on the attention mask, so pads are compared too."""
    got, want = converted["text_hidden_states"][0], expected["text_hidden_states"][0]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_inputs_use_the_default_positions(paddle_ref: Path) -> None:
    """The text tower takes no position ids: the reference must use 0..L-1 on every row."""
    inputs = load_npz(paddle_ref / "inputs.npz")
    ids, pos = inputs["input_ids"], inputs["pos_ids"]
    assert pos.shape == ids.shape
    np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(ids.shape[1]), ids.shape))


def test_contrastive_head_matches(converted, expected) -> None:
    k = int(expected["contrastive_k"])
    assert k == min(len(converted["image_embeds"]), len(converted["text_pooled"]))
    temperature = expected["temperature_b"].float()
    logit_scale = converted["logit_scale"].reshape(temperature.shape)
    torch.testing.assert_close(logit_scale, temperature, atol=0, rtol=0)
    image, text, scale = converted["head"]
    torch.testing.assert_close(scale, expected["logit_scale"].float(), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(image, expected["image_embeds_norm"][:k], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(text, expected["text_pooled_norm"][:k], atol=ATOL, rtol=RTOL)
    logits = scale * image @ text.T
    torch.testing.assert_close(logits, expected["logits_per_image"], atol=ATOL, rtol=RTOL)
    labels = torch.arange(k)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(loss, expected["contrastive_loss"].float(), atol=ATOL, rtol=RTOL)
