"""Batches as loader workers build them: skip counts per reason that travel on the batches (every skip once,
the last ones after the last batch), stacked samples with text ids cut to one length, uint8 images made
float on the device side."""

from __future__ import annotations

import functools
import io
import logging
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds

from ernievil2_train.data.batches import (
    SKIPPED_KEY,
    Collate,
    SkipCounter,
    normalize_batch,
    trim_text_ids,
    with_final_skips,
)
from ernievil2_train.data.decode import SKIP_REASONS, SkipSample, parse_sample
from ernievil2_train.data.sources import read_shards
from ernievil2_train.data.views import SampleTransform
from ernievil2_train.vision.transforms import MEAN, STD
from tests.data.shard_helpers import sample, write_shard, write_vocab

LOGGER = "ernievil2_train.data.batches"


def counts(**per_reason: int) -> torch.Tensor:
    """A skip count tensor: `per_reason` at their reasons' places, 0 elsewhere."""
    return torch.tensor([per_reason.get(reason, 0) for reason in SKIP_REASONS], dtype=torch.long)


def pipeline(urls: list[str], counter: SkipCounter, *stages: object) -> wds.DataPipeline:
    """Shards read and grouped as the data module reads them, counted by `counter`, then `stages`."""
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        functools.partial(read_shards, counter=counter),
        functools.partial(wds.tariterators.group_by_keys, handler=counter.tar_handler),
        *stages,
    )


@pytest.fixture(scope="module")
def vocab(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt"))


def test_counts_are_kept_per_reason_and_taken_once() -> None:
    counter = SkipCounter()
    assert torch.equal(counter.take(), counts())
    counter.count("bad_image", "s00001: not an image")
    counter.count("short_shard", "a.tar: holds 5 of the 8 samples its index lists", samples=3)
    counter.count("bad_image", "s00002: not an image")
    taken = counter.take()
    assert taken.dtype == torch.long and torch.equal(taken, counts(bad_image=2, short_shard=3))
    assert torch.equal(counter.take(), counts())
    counter.count("other", "s00003: KeyError")
    assert torch.equal(counter.take(), counts(other=1))
    assert counter.total == counts(bad_image=2, short_shard=3, other=1).tolist()


def test_only_the_first_skips_of_each_reason_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A shard of broken samples must not flood the log: each reason logs its first five skips."""
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for i in range(7):
            counter.count("bad_image", f"s{i:05d}: not an image")
        counter.count("short_shard", "a.tar: holds 2 of the 8 samples its index lists", samples=6)
        counter.count("short_shard", "b.tar: holds 7 of the 8 samples its index lists")
        counter.count("bad_text", "s00009: empty caption")
    assert caplog.messages == [
        *(f"skipped a sample (bad_image): s{i:05d}: not an image" for i in range(5)),
        "skipped a sample (short_shard): a.tar: holds 2 of the 8 samples its index lists",
        "skipped a sample (bad_text): s00009: empty caption",
    ]
    assert torch.equal(counter.take(), counts(bad_image=7, short_shard=7, bad_text=1))


def test_handlers_count_by_reason_and_let_the_stream_go_on(caplog: pytest.LogCaptureFixture) -> None:
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert counter.tar_handler(ValueError("s1.txt: duplicate file name in tar file")) is True
        assert counter.sample_handler(SkipSample("bad_json", "s00002: json must be an object")) is True
        assert counter.sample_handler(KeyError("image_key")) is True
    assert torch.equal(counter.take(), counts(bad_tar=1, bad_json=1, other=1))
    assert caplog.messages == [
        "skipped a sample (bad_tar): ValueError: s1.txt: duplicate file name in tar file",
        "skipped a sample (bad_json): bad_json: s00002: json must be an object",
        "skipped a sample (other): KeyError: 'image_key'",
    ]


def test_a_real_stream_counts_every_corrupt_sample_and_shard_once(tmp_path: Path) -> None:
    """Broken samples, a truncated tar and a missing shard are each counted under their reason, once; every
    good sample comes through, those read before the cut included."""
    write_shard(tmp_path / "a.tar", [sample(0), {**sample(1), "jpg": b"not a jpeg"}, sample(2),
                                     {**sample(3), "txt": b" "}, {**sample(4), "json": b"[1]"},
                                     {k: v for k, v in sample(5).items() if k != "txt"}])
    cut = write_shard(tmp_path / "b.tar", [sample(i) for i in range(6, 12)])
    with tarfile.open(cut) as tar:
        image = next(m for m in tar.getmembers() if m.name == "s00009.jpg")
    cut.write_bytes(cut.read_bytes()[: image.offset_data + 20])
    counter = SkipCounter()
    urls = [str(tmp_path / name) for name in ("a.tar", "b.tar", "gone.tar")]
    keys = [raw.key for raw in pipeline(urls, counter, wds.map(parse_sample, handler=counter.sample_handler))]
    assert keys == ["s00000", "s00002", "s00006", "s00007", "s00008"]
    expected = counts(bad_tar=2, missing_field=1, bad_text=1, bad_json=1, bad_image=1)
    assert torch.equal(counter.take(), expected)


def test_a_sample_with_a_duplicate_member_is_left_out_and_the_shard_reads_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two captions under one name: which is the sample's is unknown, so the sample is skipped (not read
    with the first of them), counted once as a bad tar, and the message names the shard and the member."""
    members = [("s1.jpg", sample(1)["jpg"]), ("s1.txt", "一只狗".encode()), ("s1.txt", "两个人".encode()),
               ("s2.jpg", sample(2)["jpg"]), ("s2.txt", "一只猫".encode())]
    with tarfile.open(tmp_path / "dup.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        raws = list(pipeline([str(tmp_path / "dup.tar")], counter, wds.map(parse_sample)))
    assert [(raw.key, raw.caption) for raw in raws] == [("s2", "一只猫")]
    assert torch.equal(counter.take(), counts(bad_tar=1))
    assert caplog.messages == [f"skipped a sample (bad_tar): {tmp_path / 'dup.tar'}: sample s1: two members "
                               "named s1.txt"]


def test_collate_stacks_samples_and_carries_the_skips_since_the_last_batch(vocab: str) -> None:
    """String fields (the sample key webdataset keeps) are left out; text ids are cut to one length."""
    transform = SampleTransform(vocab, image_size=32, uint8_images=True)
    counter = SkipCounter()
    collate = Collate(counter)
    samples = [{**transform(sample(i)), "__key__": f"s{i:05d}"} for i in range(3)]
    counter.count("bad_image", "s00009: not an image")
    batch = collate(samples)
    assert set(batch) == {*samples[0], SKIPPED_KEY} - {"__key__"}
    assert batch["image"].shape == (3, 3, 32, 32) and batch["image"].dtype == torch.uint8
    assert torch.equal(batch["image_key"], torch.stack([s["image_key"] for s in samples]))
    width = batch["caption_ids"].shape[1]
    assert width % 8 == 0 and width < samples[0]["caption_ids"].shape[0]
    for key in ("caption_ids", "text_view_ids", "tag_ids"):
        assert torch.equal(batch[key], torch.stack([s[key] for s in samples])[:, :width])
    assert torch.equal(batch[SKIPPED_KEY], counts(bad_image=1))
    assert torch.equal(collate(samples[:1])[SKIPPED_KEY], counts())


def _ids(*real: int, width: int = 48) -> torch.Tensor:
    """Rows of `width` ids whose first `real[i]` columns hold tokens, the rest padding."""
    rows = torch.zeros(len(real), width, dtype=torch.long)
    for row, length in zip(rows, real, strict=True):
        row[:length] = torch.arange(5, 5 + length)
    return rows


def test_text_ids_are_cut_to_the_longest_real_row_of_any_view_rounded_to_8() -> None:
    batch = {"caption_ids": _ids(3, 5), "text_view_ids": _ids(2, 4), "tag_ids": _ids(11, 0),
             "image_key": torch.arange(2), "other_ids": _ids(1, 1)}
    trimmed = trim_text_ids(dict(batch))
    for key in ("caption_ids", "text_view_ids", "tag_ids"):
        assert torch.equal(trimmed[key], batch[key][:, :16])
    assert trimmed["other_ids"] is batch["other_ids"] and trimmed["image_key"] is batch["image_key"]
    assert trim_text_ids({"caption_ids": _ids(0, 0)})["caption_ids"].shape == (2, 8)
    assert trim_text_ids({"caption_ids": _ids(10, width=12)})["caption_ids"].shape == (1, 12)
    assert trim_text_ids({"caption_ids": _ids(16)})["caption_ids"].shape == (1, 16)
    skips_only = {SKIPPED_KEY: counts(bad_tar=1)}
    assert trim_text_ids(skips_only) == skips_only


def test_uint8_images_become_the_normalised_float_images() -> None:
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    batch = {"image": images.clone(), "image_view2": images.flip(0), "has_tags": images[:, 0]}
    batch = normalize_batch(batch)
    torch.testing.assert_close(batch["image"], (images / 255 - mean) / std, atol=1e-6, rtol=0)
    torch.testing.assert_close(batch["image_view2"], (images.flip(0) / 255 - mean) / std, atol=1e-6, rtol=0)
    assert batch["image"].dtype == torch.float32
    assert torch.equal(batch["has_tags"], images[:, 0])


def test_float_images_and_skip_only_batches_pass_unchanged() -> None:
    floats = torch.rand(2, 3, 4, 4)
    batch = normalize_batch({"image": floats.clone()})
    assert batch["image"].dtype == torch.float32 and torch.equal(batch["image"], floats)
    skips_only = {SKIPPED_KEY: counts(bad_image=2)}
    assert normalize_batch(skips_only) == skips_only


def test_skips_after_the_last_batch_come_in_a_batch_of_their_own() -> None:
    counter = SkipCounter()
    batches = [{SKIPPED_KEY: counts(bad_text=1)}, {SKIPPED_KEY: counts()}]
    assert list(with_final_skips(iter(batches), counter)) == batches
    counter.count("bad_image", "s00007: not an image", samples=2)
    stream = list(with_final_skips(iter(batches), counter))
    assert stream[:2] == batches and len(stream) == 3
    assert set(stream[2]) == {SKIPPED_KEY} and torch.equal(stream[2][SKIPPED_KEY], counts(bad_image=2))
    assert list(with_final_skips(iter([]), counter)) == []


@pytest.mark.parametrize(("good", "batch_size"), [(4, 2), (4, 3), (4, 10), (0, 2)])
def test_the_skips_summed_over_a_pass_are_every_skip_once(
    tmp_path: Path, vocab: str, good: int, batch_size: int
) -> None:
    """As validation batches them: whatever the batch size, with corrupt samples last in the shard, or with
    no good sample at all, the pass's batches carry all its skips, and every good sample."""
    goods = [sample(i) for i in range(good)]
    corrupt = [{**sample(10 + i), "jpg": b"not a jpeg"} for i in range(3)]
    shard = write_shard(tmp_path / "val.tar", [*goods[:1], corrupt[0], *goods[1:], *corrupt[1:]])
    counter = SkipCounter()
    batches = list(pipeline(
        [str(shard), str(tmp_path / "gone.tar")], counter,
        wds.map(SampleTransform(vocab, image_size=32, train=False), handler=counter.sample_handler),
        wds.batched(batch_size, collation_fn=Collate(counter), partial=True),
        functools.partial(with_final_skips, counter=counter),
    ))
    assert sum(len(b["image"]) for b in batches if "image" in b) == good
    assert torch.equal(sum(b[SKIPPED_KEY] for b in batches), counts(bad_image=3, bad_tar=1))
    assert all(b[SKIPPED_KEY].shape == (len(SKIP_REASONS),) for b in batches)
