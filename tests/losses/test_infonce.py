"""Unit tests of the multi-view InfoNCE loss against brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ernievil2_train.losses import MAX_LOG_SCALE, LossConfig, MultiViewInfoNCE, symmetric_infonce

FEATURES = ("image", "image_view2", "caption", "text_view", "tags")


def _features(n: int, d: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1) for k in FEATURES}


def _clip_reference(img: torch.Tensor, txt: torch.Tensor, scale: float) -> torch.Tensor:
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    labels = torch.arange(len(img))
    return (F.cross_entropy(scale * img @ txt.T, labels) + F.cross_entropy(scale * txt @ img.T, labels)) / 2


def _soft_reference(a: torch.Tensor, b: torch.Tensor, scale: float, keys: list[list], valid: list) -> float:
    """Row-by-row loops: every valid sample against every valid sample, positives = equal in any key."""
    terms = []
    idx = [i for i in range(len(valid)) if valid[i]]
    for rows, cols in ((a, b), (b, a)):
        for i in idx:
            logits = [scale * float(rows[i] @ cols[j]) for j in idx]
            lse = math.log(sum(math.exp(v) for v in logits))
            pos = [k for k, j in enumerate(idx) if any(key[j] == key[i] for key in keys)]
            terms.append(-sum(logits[k] - lse for k in pos) / len(pos))
    return sum(terms) / len(terms)


def _loss(cfg: dict, feats, image_key, caption_key, has_tags, log_scale=2.0, tags_key=None,
          text_view_key=None):
    module = MultiViewInfoNCE(LossConfig(**{"temperature": "shared", **cfg})).double()
    scale = torch.tensor(log_scale, dtype=torch.float64)
    return module(feats, image_key, caption_key, has_tags, scale, tags_key=tags_key,
                  text_view_key=text_view_key)


def test_image_caption_equals_clip_loss():
    n = 6
    feats = _features(n)
    keys = torch.arange(n)
    out = _loss({"weights": {"image_caption": 1.0}}, feats, keys, keys, None, log_scale=1.7)
    ref = _clip_reference(feats["image"], feats["caption"], math.exp(1.7))
    torch.testing.assert_close(out["loss_image_caption"], ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(out["loss"], ref, atol=1e-12, rtol=0)


def test_image_caption_matches_paddle_head(paddle_ref):
    outputs = np.load(paddle_ref / "outputs.npz")
    k = int(outputs["contrastive_k"])
    img = torch.from_numpy(outputs["image_embeds"][:k]).float()
    txt = torch.from_numpy(outputs["text_pooled"][:k]).float()
    module = MultiViewInfoNCE(LossConfig(weights={"image_caption": 1.0}))
    keys = torch.arange(k)
    feats = {"image": F.normalize(img, dim=-1), "caption": F.normalize(txt, dim=-1)}
    out = module(feats, keys, keys, None, torch.tensor(float(outputs["temperature_b"])))
    expected = torch.tensor(float(outputs["contrastive_loss"]))
    torch.testing.assert_close(out["loss_image_caption"], expected, atol=1e-5, rtol=1e-4)
    reference = _clip_reference(img, txt, float(outputs["logit_scale"]))
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pair,rows,cols", [
    ("image_caption", "image", "caption"),
    ("image_image", "image", "image_view2"),
    ("text_text", "caption", "text_view"),
])
def test_each_pair_uses_its_views(pair, rows, cols):
    feats = _features(5, seed=1)
    keys = torch.arange(5)
    out = _loss({"weights": {pair: 1.0}}, feats, keys, keys, None)
    torch.testing.assert_close(out[f"loss_{pair}"], _clip_reference(feats[rows], feats[cols], math.exp(2.0)))
    assert set(out) == {"loss", f"loss_{pair}", f"acc_{pair}"}


def test_view_pairing_option_selects_second_view():
    feats = _features(5, seed=2)
    keys = torch.arange(5)
    weights = {"image_caption": 1.0, "image_tags": 1.0}
    cfg = {"weights": weights, "caption_image_view": 2, "tags_image_view": 2}
    out = _loss(cfg, feats, keys, keys, torch.ones(5, dtype=torch.bool))
    view2, scale = feats["image_view2"], math.exp(2.0)
    torch.testing.assert_close(out["loss_image_caption"], _clip_reference(view2, feats["caption"], scale))
    torch.testing.assert_close(out["loss_image_tags"], _clip_reference(view2, feats["tags"], scale))
    assert LossConfig(**cfg).required_features() == ["image_view2", "caption", "tags"]


def test_samples_without_tags_drop_out_of_rows_and_columns():
    n = 7
    feats = _features(n, seed=3)
    has_tags = torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    keys = torch.arange(n)
    out = _loss({"weights": {"image_tags": 1.0}}, feats, keys, keys, has_tags)
    keep = has_tags.nonzero().squeeze(1)
    ref = _clip_reference(feats["image"][keep], feats["tags"][keep], math.exp(2.0))
    torch.testing.assert_close(out["loss_image_tags"], ref, atol=1e-12, rtol=0)
    # the dropped samples have no influence at all
    feats["tags"][1] = F.normalize(torch.randn(8, dtype=torch.float64), dim=0)
    again = _loss({"weights": {"image_tags": 1.0}}, feats, keys, keys, has_tags)
    torch.testing.assert_close(again["loss_image_tags"], ref, atol=1e-12, rtol=0)


def test_no_tags_anywhere_gives_zero_finite_loss_and_gradient():
    feats = {k: v.clone().requires_grad_(True) for k, v in _features(4, seed=4).items()}
    keys = torch.arange(4)
    out = _loss({"weights": {"image_tags": 1.0}}, feats, keys, keys, torch.zeros(4, dtype=torch.bool))
    assert out["loss"].item() == 0.0
    out["loss"].backward()
    assert torch.isfinite(feats["image"].grad).all() and torch.isfinite(feats["tags"].grad).all()


def test_multi_positive_matches_brute_force():
    image_key = torch.tensor([5, 9, 5, 2, 9, 5, 7])
    caption_key = torch.tensor([1, 1, 3, 4, 5, 3, 6])
    has_tags = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    tags_key = torch.tensor([8, 1, 0, 8, 2, 3, 0])
    n = len(image_key)
    feats = _features(n, seed=5)
    cfg = {
        "weights": {"image_caption": 1.0, "image_tags": 0.5, "image_image": 0.3, "text_text": 0.2},
        "multi_positive": True,
        "temperature": "shared",
    }
    out = _loss(cfg, feats, image_key, caption_key, has_tags, log_scale=1.3, tags_key=tags_key)
    s = math.exp(1.3)
    ik, ck, tk, all_valid = image_key.tolist(), caption_key.tolist(), tags_key.tolist(), [True] * n
    refs = {  # samples 0 and 1: one caption written alike for two images, which match both; so the tags
        # of samples 0 and 3
        "image_caption": _soft_reference(feats["image"], feats["caption"], s, [ik, ck], all_valid),
        "image_tags": _soft_reference(feats["image"], feats["tags"], s, [ik, tk], has_tags.tolist()),
        "image_image": _soft_reference(feats["image"], feats["image_view2"], s, [ik], all_valid),
        "text_text": _soft_reference(feats["caption"], feats["text_view"], s, [ck], all_valid),
    }
    for pair, ref in refs.items():
        assert out[f"loss_{pair}"].item() == pytest.approx(ref, abs=1e-10), pair
    total = sum(cfg["weights"][p] * refs[p] for p in refs)
    assert out["loss"].item() == pytest.approx(total, abs=1e-10)


def test_text_view_keys_mark_the_text_text_positives_and_caption_keys_the_image_caption_ones():
    """With `second_caption` views the two differ: samples of one image share a text-view key (their views
    are each other's captions), a caption written alike for two images shares a caption key."""
    image_key = torch.tensor([5, 5, 6, 7, 8])
    caption_key = torch.tensor([1, 2, 3, 3, 4])  # samples 2 and 3: two images, one caption
    text_view_key = torch.tensor([9, 9, 3, 4, 5])  # samples 0 and 1: one image's caption set
    n = len(image_key)
    feats = _features(n, seed=8)
    cfg = {"weights": {"image_caption": 1.0, "text_text": 1.0}, "multi_positive": True}
    out = _loss(cfg, feats, image_key, caption_key, None, log_scale=1.1, text_view_key=text_view_key)
    s, valid = math.exp(1.1), [True] * n
    ik, ck, vk = image_key.tolist(), caption_key.tolist(), text_view_key.tolist()
    image_caption = _soft_reference(feats["image"], feats["caption"], s, [ik, ck], valid)
    text_text = _soft_reference(feats["caption"], feats["text_view"], s, [vk], valid)
    assert out["loss_image_caption"].item() == pytest.approx(image_caption, abs=1e-10)
    assert out["loss_text_text"].item() == pytest.approx(text_text, abs=1e-10)
    without = _loss(cfg, feats, image_key, caption_key, None, log_scale=1.1)  # the caption keys then
    assert without["loss_text_text"].item() == pytest.approx(
        _soft_reference(feats["caption"], feats["text_view"], s, [ck], valid), abs=1e-10)


def test_the_tag_pair_without_a_tag_mask_is_refused_by_name():
    feats = _features(3, seed=2)
    keys = torch.arange(3)
    with pytest.raises(ValueError, match=r"^has_tags: the image_tags pair needs it \(which samples have "):
        _loss({"weights": {"image_tags": 1.0}}, feats, keys, keys, None)


def test_keys_are_a_sequence_of_key_tensors():
    feats = _features(3, seed=2)
    with pytest.raises(TypeError, match=r"^keys: a sequence of \[N\] key tensors"):
        symmetric_infonce(feats["image"], feats["caption"], feats["caption"], feats["image"],
                          torch.tensor(1.0), 0, keys=torch.arange(3))


def test_multi_positive_with_unique_keys_equals_hard_labels():
    feats = _features(6, seed=6)
    keys = torch.arange(6) * 11
    hard = _loss({"weights": {"image_caption": 1.0}}, feats, keys, keys, None)
    soft = _loss({"weights": {"image_caption": 1.0}, "multi_positive": True}, feats, keys, keys, None)
    torch.testing.assert_close(soft["loss"], hard["loss"], atol=1e-12, rtol=0)


def test_rank_shares_average_to_global_loss():
    n, world = 8, 2
    feats = _features(n, seed=7)
    image_key = torch.tensor([0, 1, 0, 3, 4, 1, 6, 7])
    has_tags = torch.tensor([1, 0, 0, 0, 1, 1, 1, 1], dtype=torch.bool)  # uneven valid counts per rank
    for valid in (None, has_tags):
        for keys in (None, [image_key]):
            full, _ = symmetric_infonce(feats["image"], feats["tags"], feats["tags"], feats["image"],
                                        torch.tensor(3.0), 0, 1, keys=keys, valid=valid)
            shares = []
            for r in range(world):
                rows = slice(r * 4, (r + 1) * 4)
                shares.append(symmetric_infonce(feats["image"][rows], feats["tags"], feats["tags"][rows],
                                                feats["image"], torch.tensor(3.0), r * 4, world, keys=keys,
                                                valid=valid)[0])
            torch.testing.assert_close(sum(shares) / world, full, atol=1e-12, rtol=0)


def test_logits_stay_in_float32_under_mixed_precision():
    """Under bf16 autocast (the GPU trainer configs) the logits are still float32 products of the float32
    features: the loss and its gradient equal those computed without autocast."""
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(64, 96, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(64, 96, generator=g), dim=-1)
    scale = torch.tensor(100.0)
    results = []
    for autocast in (False, True):
        img.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = symmetric_infonce(img, txt, txt, img, scale, 0)
        loss.backward()
        results.append((loss.detach(), img.grad.clone()))
    (plain, plain_grad), (mixed, mixed_grad) = results
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, rtol=1e-6, atol=0)
    torch.testing.assert_close(mixed_grad, plain_grad, rtol=1e-5, atol=1e-8)


def test_accuracy_counts_top1_hits():
    feats = _features(5, seed=8)
    feats["caption"] = feats["image"].clone()
    keys = torch.arange(5)
    out = _loss({"weights": {"image_caption": 1.0}}, feats, keys, keys, None, log_scale=4.0)
    assert out["acc_image_caption"].item() == 1.0
    feats["caption"] = feats["image"].roll(1, dims=0)
    out = _loss({"weights": {"image_caption": 1.0}}, feats, keys, keys, None, log_scale=4.0)
    assert out["acc_image_caption"].item() == 0.0


def test_temperature_modes():
    feats = {k: v.requires_grad_(True) for k, v in _features(4, seed=9).items()}
    keys = torch.arange(4)
    weights = {"image_caption": 1.0, "text_text": 1.0}
    per_pair = MultiViewInfoNCE(LossConfig(weights=weights, temperature_init=1.5))
    assert list(per_pair.log_scales) == ["text_text"]
    assert per_pair.log_scales["text_text"].item() == pytest.approx(1.5)
    assert len(MultiViewInfoNCE(LossConfig(weights=weights, temperature="shared")).log_scales) == 0
    for mode, model_grad in (("per_pair", True), ("shared", True), ("fixed", False)):
        module = MultiViewInfoNCE(LossConfig(weights=weights, temperature=mode)).double()
        model_scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        module(feats, keys, keys, None, model_scale)["loss"].backward()
        assert (model_scale.grad is not None) == model_grad, mode
    only_caption = MultiViewInfoNCE(LossConfig(weights={"image_caption": 1.0, "image_tags": 0.0}))
    assert len(only_caption.log_scales) == 0


def test_clamp_keeps_log_scales_in_range():
    weights = {"image_caption": 1.0, "image_image": 1.0, "text_text": 1.0}
    module = MultiViewInfoNCE(LossConfig(weights=weights))
    with torch.no_grad():
        module.log_scales["image_image"].fill_(7.0)
        module.log_scales["text_text"].fill_(-1.0)
    module.clamp_()
    assert module.log_scales["image_image"].item() == pytest.approx(MAX_LOG_SCALE)
    assert module.log_scales["text_text"].item() == 0.0


def test_weight_zero_pairs_are_not_computed_or_encoded():
    cfg = LossConfig(weights={"image_caption": 1.0, "image_tags": 0.0, "image_image": 0.0, "text_text": 0.0})
    assert cfg.required_features() == ["image", "caption"]
    feats = _features(4, seed=10)
    feats = {k: feats[k] for k in cfg.required_features()}  # absent views would raise if they were used
    out = _loss({"weights": cfg.weights}, feats, torch.arange(4), torch.arange(4), None)
    assert set(out) == {"loss", "loss_image_caption", "acc_image_caption"}


@pytest.mark.parametrize("cfg,match", [
    ({"weights": {"image_text": 1.0}}, "unknown module.loss.weights"),
    ({"weights": {"image_caption": 0.0}}, "every pair has weight 0"),
    ({"weights": {"image_caption": -1.0}}, ">= 0"),
    ({"temperature": "learned"}, "loss.temperature"),
    ({"caption_image_view": 3}, "caption_image_view"),
    ({"tags_image_view": True}, "tags_image_view must be 1 or 2"),
    ({"weights": {"image_caption": float("nan")}}, "weights.image_caption must be a finite number"),
    ({"weights": {"image_caption": 1.0, "text_text": float("inf")}}, "weights.text_text must be a finite"),
    ({"weights": {"image_caption": "0.5"}}, "weights.image_caption must be a finite number"),
    ({"weights": ["image_caption"]}, "weights must map pair names"),
    ({"multi_positive": "false"}, "multi_positive must be true or false"),
    ({"temperature_init": float("nan")}, "temperature_init"),
    ({"temperature_init": 5.0}, r"temperature_init .* \[0, ln 100"),
    ({"temperature_init": -0.5}, "temperature_init"),
    ({"temperature_init": "2.6"}, "temperature_init"),
])
def test_config_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**cfg)


def test_from_any_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown loss config field"):
        LossConfig.from_any({"weights": {"image_caption": 1.0}, "temprature": "fixed"})


def test_composed_config_values_are_accepted():
    """A Hydra-composed loss config (DictConfig weights, int weights, range ends) passes the checks."""
    from omegaconf import OmegaConf

    node = OmegaConf.create({"weights": {"image_caption": 1, "text_text": 0.5}, "temperature_init": 0})
    cfg = LossConfig.from_any(node)
    assert cfg.weights == {"image_caption": 1.0, "text_text": 0.5} and cfg.temperature_init == 0.0
    assert LossConfig(temperature_init=MAX_LOG_SCALE).temperature_init == MAX_LOG_SCALE


def test_duplicate_keys_without_multi_positive_keep_hard_labels() -> None:
    """With `multi_positive` off, duplicated image keys change neither loss nor accuracy: one positive per
    row, the diagonal (the CLIP loss); with it on, the duplicates are positives and both change."""
    feats = _features(6, seed=11)
    feats["caption"] = feats["image"][[1, 0, 3, 2, 5, 4]]  # each row's nearest column: its key's twin
    duplicated, distinct = torch.tensor([0, 0, 1, 1, 2, 2]), torch.arange(6)
    weights = {"image_caption": 1.0}
    hard = _loss({"weights": weights}, feats, duplicated, distinct, None, log_scale=4.0)
    unique = _loss({"weights": weights}, feats, distinct, distinct, None, log_scale=4.0)
    reference = _clip_reference(feats["image"], feats["caption"], math.exp(4.0))
    torch.testing.assert_close(hard["loss"], reference, atol=1e-12, rtol=0)
    torch.testing.assert_close(hard["loss"], unique["loss"], atol=1e-12, rtol=0)
    assert hard["acc_image_caption"].item() == unique["acc_image_caption"].item() == 0.0
    soft = _loss({"weights": weights, "multi_positive": True}, feats, duplicated, distinct, None,
                 log_scale=4.0)
    assert soft["loss"].item() < 0.6 * hard["loss"].item()
    assert soft["acc_image_caption"].item() == 1.0


def test_multi_positive_accuracy_is_brute_force_top1_of_both_directions() -> None:
    """A row scores a hit when its most similar column is one of its positives (equal in any key), in each
    direction; the accuracy is the hits over both directions' rows."""
    g = torch.Generator().manual_seed(12)
    n = 12
    image = F.normalize(torch.randn(n, 8, generator=g, dtype=torch.float64), dim=-1)
    caption = F.normalize(image + 0.9 * torch.randn(n, 8, generator=g, dtype=torch.float64), dim=-1)
    image_key = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6, 7])
    caption_key = torch.tensor([10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 16])
    keys = [image_key.tolist(), caption_key.tolist()]
    hits = 0
    for rows, cols in ((image, caption), (caption, image)):
        for i in range(n):
            j = max(range(n), key=lambda c: float(rows[i] @ cols[c]))
            hits += any(key[j] == key[i] for key in keys)
    _, acc = symmetric_infonce(image, caption, caption, image, torch.tensor(3.0, dtype=torch.float64), 0,
                               keys=[image_key, caption_key])
    assert 0 < hits < 2 * n
    assert acc.item() == pytest.approx(hits / (2 * n), abs=1e-6)
