"""Shard sources: every form a data set can be named in resolves to its urls and indexed sample counts."""

from __future__ import annotations

import os

import pytest

from ernievil2_train.data.sources import resolve_shards
from tests.data.shard_helpers import PER_SHARD, sample, write_shard, write_split

SHARDS = 4


def test_resolve_shards_in_every_form(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_split(data, "train", SHARDS, 0)
    write_split(data, "val", 2, 1000)
    urls, total, sizes = resolve_shards(str(data), "train", "k")
    assert [u.rsplit("/", 1)[1] for u in urls] == [f"train-{s:06d}.tar" for s in range(SHARDS)]
    assert total == PER_SHARD * SHARDS
    assert sizes == {os.path.realpath(u): PER_SHARD for u in urls}
    assert resolve_shards(str(data / "train.json"), "val", "k") == (urls, total, sizes)
    pattern = str(data / "train-{000001..000002}.tar")
    assert resolve_shards(pattern, "train", "k") == (urls[1:3], 2 * PER_SHARD, sizes)
    assert resolve_shards(str(data / "val-*.tar"), "train", "k").urls[0].endswith("val-000000.tar")
    listing = tmp_path / "shards.txt"
    listing.write_text("\n".join(["# comment", *urls[:2], ""]))
    assert resolve_shards(str(listing), "train", "k") == (urls[:2], 2 * PER_SHARD, sizes)
    both, total, _ = resolve_shards([str(data), str(data)], "train", "k")
    assert both == urls + urls and total == 2 * PER_SHARD * SHARDS
    bare = tmp_path / "bare"
    bare.mkdir()
    write_shard(bare / "train-000000.tar", [sample(0)])
    assert resolve_shards(str(bare), "train", "k") == ([str(bare / "train-000000.tar")], None, {})


def test_a_pattern_or_list_naming_missing_shards_is_refused(tmp_path):
    """A brace pattern or a list that names shards which are not there would train on the others without a
    word: refused, naming the first missing shard and how many more."""
    write_split(tmp_path, "train", 2, 0)
    pattern = str(tmp_path / "train-{000000..000004}.tar")
    with pytest.raises(FileNotFoundError) as caught:
        resolve_shards(pattern, "train", "data.train_shards")
    missing = tmp_path / "train-000002.tar"
    expected = f"data.train_shards: {pattern} names shards that are not there: {missing} and 2 more"
    assert str(caught.value) == expected
    listing = tmp_path / "shards.txt"
    listing.write_text(f"{tmp_path / 'train-000000.tar'}\n{missing}\n")
    with pytest.raises(FileNotFoundError, match=rf"{listing} names shards that are not there: {missing}$"):
        resolve_shards(str(listing), "train", "data.train_shards")
    listing.write_text(f"{tmp_path / 'train-000000.tar'}\nhttp://example.invalid/train-000009.tar\n")
    assert len(resolve_shards(str(listing), "train", "k").urls) == 2  # remote shards are read when used


def test_an_index_listing_a_missing_shard_is_refused(tmp_path):
    write_split(tmp_path, "train", 2, 0)
    (tmp_path / "train-000001.tar").unlink()
    index = tmp_path / "train.json"
    for spec in (tmp_path, index):
        with pytest.raises(FileNotFoundError) as caught:
            resolve_shards(str(spec), "train", "data.train_shards")
        assert str(caught.value) == (f"data.train_shards: {index} names shards that are not there: "
                                     f"{tmp_path / 'train-000001.tar'}")


def test_a_folder_of_shards_named_for_no_split_is_read_whole(tmp_path):
    """img2dataset names its shards 00000.tar, 00001.tar, ...: a folder of them is the data set."""
    for s in range(2):
        write_shard(tmp_path / f"{s:05d}.tar", [sample(s * PER_SHARD + i) for i in range(PER_SHARD)])
    urls = [str(tmp_path / f"{s:05d}.tar") for s in range(2)]
    assert resolve_shards(str(tmp_path), "train", "k") == (urls, None, {})
    write_shard(tmp_path / "valid-000000.tar", [sample(99)])  # a split-named shard: no longer read whole
    with pytest.raises(FileNotFoundError, match=r"no train-\*\.tar shards in directory .* \(it holds valid"):
        resolve_shards(str(tmp_path), "train", "k")


def test_a_half_published_split_is_refused_by_its_own_name(tmp_path) -> None:
    """`.{split}.publishing` (a recipe run killed while moving the split into place) refuses that split, a
    dot in its name included, and no other split of the folder."""
    for split in ("train", "train.v2"):
        write_shard(tmp_path / f"{split}-000000.tar", [sample(0)])
    (tmp_path / ".train.v2.publishing").touch()
    with pytest.raises(ValueError, match=r"data.train_shards: split 'train.v2' of .* is a mix of two recipe"):
        resolve_shards(str(tmp_path / "train.v2-000000.tar"), "train.v2", "data.train_shards")
    assert resolve_shards(str(tmp_path), "train", "data.train_shards").urls == [
        str(tmp_path / "train-000000.tar")]
