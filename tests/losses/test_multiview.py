"""From a multi-view batch to losses: needed batch keys, one encode call per tower, metadata, precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ernievil2_train.losses import MultiViewInfoNCE
from ernievil2_train.losses.multiview import (
    BATCH_KEYS,
    batch_metadata,
    encode_views,
    gathered_losses,
    required_batch_keys,
)
from ernievil2_train.models import DualEncoder
from ernievil2_train.models.dual_encoder import float32_or_wider
from tests.training_helpers import ALL_PAIRS, make_batch, tiny_model


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, {"image": "image_caption", "caption_ids": "image_caption"}),
        ({"weights": {"image_tags": 1.0}, "tags_image_view": 2},
         {"image_view2": "image_tags", "tag_ids": "image_tags", "has_tags": "image_tags"}),
        ({"weights": {"image_caption": 1.0, "text_text": 0.5}, "caption_image_view": 2,
          "multi_positive": True},
         {"image_view2": "image_caption", "caption_ids": "image_caption", "image_key": "image_caption",
          "caption_key": "image_caption", "text_view_ids": "text_text"}),
        ({"weights": ALL_PAIRS, "multi_positive": True},
         {"image": "image_caption", "caption_ids": "image_caption", "image_key": "image_caption",
          "caption_key": "image_caption", "tag_ids": "image_tags", "has_tags": "image_tags",
          "tags_key": "image_tags", "image_view2": "image_image", "text_view_ids": "text_text"}),
        ({"weights": {"image_caption": 1.0, "image_image": 0.0}}, {"image": "image_caption",
                                                                   "caption_ids": "image_caption"}),
    ],
    ids=["default", "tags-on-view-2", "caption-on-view-2-multi-positive", "all-pairs", "weight-zero-pair"],
)
def test_required_batch_keys_name_the_first_pair_needing_each(config: dict, expected: dict[str, str]) -> None:
    """Only active pairs ask for keys; the tag mask and the positive keys only when used; each key is
    attributed to the first active pair (in the fixed pair order) that needs it."""
    needed = required_batch_keys(MultiViewInfoNCE(config))
    assert needed == expected
    assert list(needed) == list(expected)


class CountingModel:
    """A real dual encoder that records the batch size of each tower call."""

    def __init__(self, model: DualEncoder) -> None:
        self.model = model
        self.calls: list[tuple[str, int]] = []

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls.append(("image", pixels.shape[0]))
        return self.model.encode_image(pixels)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls.append(("text", ids.shape[0]))
        return self.model.encode_text(ids)


@pytest.fixture(scope="module")
def model() -> DualEncoder:
    return tiny_model(seed=3).eval()


@pytest.mark.parametrize(
    ("names", "calls"),
    [
        (["image", "image_view2", "caption", "text_view", "tags"], [("image", 8), ("text", 12)]),
        (["tags", "image_view2", "caption"], [("image", 4), ("text", 8)]),
        (["caption"], [("text", 4)]),
        (["image_view2"], [("image", 4)]),
        ([], []),
    ],
    ids=["all-views", "some-views", "one-text-view", "one-image-view", "none"],
)
def test_encode_views_makes_one_call_per_tower(model: DualEncoder, names: list[str],
                                               calls: list[tuple[str, int]]) -> None:
    """Every named view gets the features it would get alone, from one stacked call per tower."""
    batch = make_batch(4, seed=1)
    counting = CountingModel(model)
    with torch.no_grad():
        out = encode_views(counting, batch, names)
        assert counting.calls == calls
        assert sorted(out) == sorted(names)
        for name in names:
            view = batch[BATCH_KEYS[name]]
            alone = model.encode_image(view) if name.startswith("image") else model.encode_text(view)
            torch.testing.assert_close(out[name], alone, atol=1e-5, rtol=1e-5)


def test_metadata_takes_the_batch_keys_as_long_columns() -> None:
    batch = {"image_key": torch.tensor([7, 7, 9], dtype=torch.int16),
             "caption_key": torch.tensor([3, 4, 5], dtype=torch.int32),
             "has_tags": torch.tensor([True, False, True]),
             "tags_key": torch.tensor([2, 8, 2]),
             "text_view_key": torch.tensor([6, 6, 1])}
    meta = batch_metadata(batch, 3, torch.device("cpu"))
    assert meta.dtype == torch.long
    assert meta.tolist() == [[7, 3, 1, 2, 6], [7, 4, 0, 8, 6], [9, 5, 1, 2, 1]]


def test_metadata_stand_ins_are_unique_keys_and_all_tagged() -> None:
    """Without keys every sample is only its own positive, and without a tag mask every sample has tags;
    without text-view keys, text-text positives are the caption keys'."""
    meta = batch_metadata({"image_key": torch.tensor([1, 1, 2, 2])}, 4, torch.device("cpu"))
    assert meta.tolist() == [[1, 0, 1, 0, 0], [1, 1, 1, 1, 1], [2, 2, 1, 2, 2], [2, 3, 1, 3, 3]]
    assert batch_metadata({}, 2, torch.device("cpu")).tolist() == [[0, 0, 1, 0, 0], [1, 1, 1, 1, 1]]
    captions = {"caption_key": torch.tensor([5, 5])}
    assert batch_metadata(captions, 2, torch.device("cpu"))[:, 4].tolist() == [5, 5]


def _losses(loss: MultiViewInfoNCE, features: dict[str, torch.Tensor], meta: torch.Tensor,
            log_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """The loss applied by hand to float32-or-wider normalised features and the metadata columns."""
    normed = {n: F.normalize(float32_or_wider(f), dim=-1) for n, f in features.items()}
    return loss(normed, meta[:, 0], meta[:, 1], meta[:, 2].bool(), log_scale, tags_key=meta[:, 3],
                text_view_key=meta[:, 4])


def test_gathered_losses_normalise_in_float32_and_read_each_metadata_column() -> None:
    """Half-precision features of any norm are normalised in float32, image keys, caption keys, tag
    mask and tag keys reach their pairs, and the gradient flows back to the half-precision features."""
    n, dim = 8, 6
    batch = make_batch(n, seed=2)
    gen = torch.Generator().manual_seed(0)
    features = {name: (5 * torch.randn(n, dim, generator=gen)).to(torch.bfloat16).requires_grad_(True)
                for name in ("image", "image_view2", "caption", "text_view", "tags")}
    meta = batch_metadata(batch, n, torch.device("cpu"))
    loss = MultiViewInfoNCE({"weights": ALL_PAIRS, "multi_positive": True})
    log_scale = torch.tensor(2.0)
    got = gathered_losses(loss, features, meta, log_scale)
    expected = _losses(loss, {k: v.detach() for k, v in features.items()}, meta, log_scale)
    assert set(got) == set(expected)
    for key in expected:
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key], expected[key], atol=0, rtol=0)
    got["loss"].backward()
    for feature in features.values():
        assert feature.grad is not None and feature.grad.dtype == torch.bfloat16 and feature.grad.any()


def test_gathered_losses_keep_float64_features_in_float64() -> None:
    n = 4
    gen = torch.Generator().manual_seed(1)
    features = {name: torch.randn(n, 5, generator=gen, dtype=torch.float64) for name in ("image", "caption")}
    meta = batch_metadata({}, n, torch.device("cpu"))
    loss = MultiViewInfoNCE({"weights": {"image_caption": 1.0}})
    log_scale = torch.tensor(1.5, dtype=torch.float64)
    got = gathered_losses(loss, features, meta, log_scale)
    assert got["loss"].dtype == torch.float64
    torch.testing.assert_close(got["loss"], _losses(loss, features, meta, log_scale)["loss"], atol=0, rtol=0)
