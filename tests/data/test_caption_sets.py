"""Plain caption sets: img2dataset's shards (LAION, Wukong, Zero...) and `jpg` + `txt` WebDatasets, where
every sample is its own image, with one caption and no tags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ernievil2_train.data.batches import SKIPPED_KEY
from ernievil2_train.data.datamodule import MultiViewDataModule
from ernievil2_train.data.decode import own_image_id
from ernievil2_train.data.keys import stable_key
from ernievil2_train.text import ErnieTokenizer
from tests.data.shard_helpers import (
    caption_of,
    image_key,
    img2dataset_sample,
    jpeg_bytes,
    sample,
    smooth_image,
    write_shard,
    write_vocab,
)

SIZE = 32
PER_SHARD = 6


def bare_sample(index: int) -> dict:
    """`jpg` + `txt` only."""
    return {"__key__": f"bare{index:05d}", "jpg": jpeg_bytes(smooth_image(80, 64, index)),
            "txt": caption_of(index).encode("utf-8")}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("caption_sets")
    write_vocab(root / "vocab.txt")
    write_shard(root / "train-000000.tar", [img2dataset_sample(i) for i in range(PER_SHARD)])
    write_shard(root / "train-000001.tar", [img2dataset_sample(i) for i in range(PER_SHARD, 2 * PER_SHARD)])
    write_shard(root / "train-000002.tar", [bare_sample(i) for i in range(PER_SHARD)])
    write_shard(root / "train-000003.tar", [bare_sample(i) for i in range(PER_SHARD, 2 * PER_SHARD)])
    return root


def expected_samples(data: Path) -> dict[int, tuple[str, str]]:
    """{image_key: (sample key, caption)} of every sample of the fixture (image id: shard url and key)."""
    expected = {}
    for shard, (make, first) in enumerate([(img2dataset_sample, 0), (img2dataset_sample, PER_SHARD),
                                           (bare_sample, 0), (bare_sample, PER_SHARD)]):
        url = str(data / f"train-{shard:06d}.tar")
        for s in map(make, range(first, first + PER_SHARD)):
            expected[stable_key(own_image_id(url, s["__key__"]))] = (s["__key__"], s["txt"].decode())
    return expected


def module(data: Path, **kw: object) -> MultiViewDataModule:
    args = {"train_shards": str(data), "vocab_file": str(data / "vocab.txt"), "image_size": SIZE,
            "batch_size": 3, "num_workers": 0, "shuffle_buffer": 10, "epoch_samples": 4 * PER_SHARD}
    return MultiViewDataModule(**{**args, **kw})


def rows_by_key(batches: list[dict], name: str) -> dict[int, torch.Tensor]:
    return {int(k): row for b in batches for k, row in zip(b["image_key"], b[name], strict=True)}


def caption_row(vocab: Path, caption: str, length: int) -> torch.Tensor:
    return ErnieTokenizer(str(vocab))([caption])["input_ids"][0, :length]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_caption_set_shards_give_training_batches_without_tags(data: Path, num_workers: int) -> None:
    """Every sample is its own image (image key = hash of its key), with its caption, no tag row, and the
    `second_caption` text view falls back to the caption itself (the image has no other)."""
    dm = module(data, num_workers=num_workers, persistent_workers=False,
                views={"text_view": "second_caption", "tags": True, "image_view2": True})
    batches = list(dm.train_dataloader())
    assert len(batches) == 4 * PER_SHARD // 3
    expected = expected_samples(data)
    keys = torch.cat([b["image_key"] for b in batches]).tolist()
    assert sorted(keys) == sorted(expected)
    assert all(int(b[SKIPPED_KEY].sum()) == 0 for b in batches)
    for batch in batches:
        assert not batch["has_tags"].any() and int(batch["tag_ids"].abs().sum()) == 0
        assert torch.equal(batch["text_view_ids"], batch["caption_ids"])
        assert batch["image_view2"].shape == batch["image"].shape == (3, 3, SIZE, SIZE)
        for key, ids, text_key in zip(batch["image_key"].tolist(), batch["caption_ids"],
                                      batch["text_view_key"], strict=True):
            caption = expected[key][1]
            assert torch.equal(ids, caption_row(data / "vocab.txt", caption, ids.shape[0]))
            assert int(text_key) == stable_key(json.dumps([caption], ensure_ascii=False))


@pytest.mark.parametrize("text_view", ["dropout", "token_drop"])
def test_other_text_views_work_on_caption_sets(data: Path, text_view: str) -> None:
    dm = module(data, views={"text_view": text_view, "tags": False, "image_view2": False})
    batches = list(dm.train_dataloader())
    expected = expected_samples(data)
    assert sorted(torch.cat([b["image_key"] for b in batches]).tolist()) == sorted(expected)
    caption_ids, text_views = rows_by_key(batches, "caption_ids"), rows_by_key(batches, "text_view_ids")
    for key, (_, caption) in expected.items():
        assert torch.equal(caption_ids[key], caption_row(data / "vocab.txt", caption, len(caption_ids[key])))
        if text_view == "dropout":
            assert torch.equal(text_views[key], caption_ids[key])
        else:  # pieces deleted: never more real ids than the caption, at least one kept
            real = int((text_views[key] > 3).sum())
            assert 1 <= real <= int((caption_ids[key] > 3).sum())
    assert all("tag_ids" not in b and "has_tags" not in b for b in batches)


def test_caption_sets_mix_with_this_projects_shards(data: Path, tmp_path: Path) -> None:
    """In one data set, recipe samples keep their image ids and tags; caption set samples have neither."""
    write_shard(tmp_path / "train-000000.tar", [sample(i) for i in range(PER_SHARD)])
    shards = [str(data / "train-000002.tar"), str(tmp_path / "train-000000.tar")]
    batches = list(module(data, train_shards=shards, val_shards=shards, epoch_samples=2 * PER_SHARD)
                   .val_dataloader())
    has_tags = {int(k): bool(t) for b in batches for k, t in zip(b["image_key"], b["has_tags"], strict=True)}
    bare = {i: stable_key(own_image_id(shards[0], f"bare{i:05d}")) for i in range(PER_SHARD)}
    assert has_tags == {**{image_key(shards[1], f"img{i}"): True for i in range(PER_SHARD)},
                        **{key: False for key in bare.values()}}
    captions = {int(k): int(c) for b in batches
                for k, c in zip(b["image_key"], b["caption_key"], strict=True)}
    assert captions[bare[1]] == stable_key(caption_of(1))  # validation: the caption's hash


def test_the_same_key_in_two_caption_sets_is_two_images(tmp_path: Path) -> None:
    """img2dataset numbers its samples from 0 in every data set: a mixed set must not merge them."""
    write_vocab(tmp_path / "vocab.txt")
    for name in ("laion", "wukong"):
        (tmp_path / name).mkdir()
        write_shard(tmp_path / name / "00000.tar", [img2dataset_sample(i) for i in range(PER_SHARD)])
    shards = [str(tmp_path / name / "00000.tar") for name in ("laion", "wukong")]
    dm = module(tmp_path, train_shards=shards, val_shards=shards, views={"tags": False, "text_view": "none"})
    keys = torch.cat([b["image_key"] for b in dm.val_dataloader()]).tolist()
    assert len(keys) == len(set(keys)) == 2 * PER_SHARD


def test_two_data_sets_numbering_their_images_alike_stay_apart(tmp_path: Path) -> None:
    """Recipes write each set's own ids (COCO-CN, Flickr30K-CN and MUGE all count from small integers, a TSV
    uses its image paths): image `img0` of one folder is not image `img0` of another, while the samples of
    one image in two shards of its folder (two captions) are one image."""
    write_vocab(tmp_path / "vocab.txt")
    for name, offset in (("a", 0), ("b", 50)):
        (tmp_path / name).mkdir()
        for shard in range(2):  # the same images in both shards: one per caption
            items = [{**sample(offset + i), "json": json.dumps({"image_id": f"img{i}"}).encode()}
                     for i in range(2)]
            write_shard(tmp_path / name / f"train-{shard:06d}.tar", items)
    shards = [str(tmp_path / name / f"train-{s:06d}.tar") for name in "ab" for s in range(2)]
    batches = list(module(tmp_path, train_shards=shards, val_shards=shards, epoch_samples=8).val_dataloader())
    keys = [int(k) for b in batches for k in b["image_key"]]
    one_per_image = [image_key(shards[first], f"img{i}") for first in (0, 2) for i in range(2)]
    assert sorted(keys) == sorted(one_per_image * 2)  # each image twice: its two shards
    assert len(set(one_per_image)) == 4
