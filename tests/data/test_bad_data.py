"""Broken data is skipped and counted per reason, exactly; every good sample still comes through."""

from __future__ import annotations

import io
import json
import random
import struct
import tarfile
import zlib
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from ernievil2_train.data import epochs
from ernievil2_train.data.batches import SKIPPED_KEY
from ernievil2_train.data.datamodule import MultiViewDataModule
from ernievil2_train.data.decode import SKIP_REASONS
from ernievil2_train.data.epochs import NoUsableSample
from ernievil2_train.module import ErnieVil2Module
from tests.data.shard_helpers import (
    error_within,
    image_key,
    jpeg_bytes,
    sample,
    serving,
    smooth_image,
    write_shard,
    write_vocab,
)
from tests.models.tiny import TINY
from tests.training_helpers import tiny_model

MAX_PIXELS = 100_000
EXPECTED = {"bad_tar": 2, "short_shard": 0, "missing_field": 4, "bad_text": 2, "bad_json": 5, "bad_image": 2,
            "image_too_large": 2, "other": 0}
GOOD = list(range(8))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header (with a valid CRC) announces `width` x `height` pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def broken(index: int, **changes) -> dict:
    item = {**sample(100 + index), "__key__": f"bad{index:03d}"}
    for name, value in changes.items():
        if value is None:
            del item[name]
        else:
            item[name] = value
    return item


def meta(**fields) -> bytes:
    return json.dumps(fields, ensure_ascii=False).encode()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    write_vocab(root / "vocab.txt")
    first = [
        sample(0),
        broken(1, jpg=b"\x00not an image at all" * 20),
        broken(2, jpg=jpeg_bytes(smooth_image(96, 72, 2))[:400]),
        sample(1),
        broken(3, txt=None),
        broken(4, txt=None, json=None),
        broken(5, jpg=None),
        broken(6, txt=b"  \n"),
        broken(7, txt=b"\xff\xfe\xfa caption"),
        broken(8, json=b"{not json"),
        broken(9, json=b'["img109"]'),
        broken(10, json=meta(image_id="i", tags="狗")),
        broken(13, json=meta(image_id=["img113"], captions=["x"])),
        broken(14, json=meta(image_id=None)),
        broken(11, jpg=None, png=bomb_png()),
        broken(12, jpg=jpeg_bytes(smooth_image(400, 300, 12))),
        sample(2),
    ]
    write_shard(root / "part-0.tar", first)
    write_shard(root / "part-1.tar", [sample(i) for i in range(3, 9)])
    raw = (root / "part-1.tar").read_bytes()
    with tarfile.open(root / "part-1.tar") as tar:
        last_json = next(m for m in tar.getmembers() if m.name == "s00008.json")
    (root / "part-1.tar").write_bytes(raw[: last_json.offset_data + 20])  # s00008 loses its json and txt
    listing = root / "shards.txt"
    listing.write_text("\n".join(str(root / n) for n in ("part-0.tar", "part-1.tar", "gone.tar")))
    return root


def counts_of(batches) -> dict[str, int]:
    total = sum(b[SKIPPED_KEY] for b in batches)
    return dict(zip(SKIP_REASONS, total.tolist(), strict=True))


def good_keys(batches) -> list[int]:
    return sorted(torch.cat([b["image_key"] for b in batches]).tolist())


def _shard_gone_after_start(data: Path, **kwargs: object) -> MultiViewDataModule:
    """A data module over `shards.txt`, whose `gone.tar` is there when the module starts (a list naming a
    missing shard is refused then) and is gone when its shards are read."""
    write_shard(data / "gone.tar", [])
    dm = MultiViewDataModule(**kwargs)
    (data / "gone.tar").unlink()
    return dm


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_bad_sample_is_counted_once_and_good_ones_pass(data, num_workers):
    shards = str(data / "shards.txt")
    dm = _shard_gone_after_start(data, train_shards=shards, vocab_file=str(data / "vocab.txt"),
                                 val_shards=shards, image_size=32, batch_size=3, num_workers=num_workers,
                                 epoch_samples=8, max_image_pixels=MAX_PIXELS, persistent_workers=False)
    batches = list(dm.val_dataloader())
    assert counts_of(batches) == EXPECTED
    assert good_keys(batches) == sorted(image_key(data / "part-0.tar", f"img{i}") for i in GOOD)


def test_training_stream_counts_the_same(data):
    shards = str(data / "shards.txt")
    dm = _shard_gone_after_start(data, train_shards=shards, vocab_file=str(data / "vocab.txt"), image_size=32,
                                 batch_size=1, num_workers=0, epoch_samples=len(GOOD) + 1, shuffle_buffer=0,
                                 shard_shuffle=0, max_image_pixels=MAX_PIXELS)
    batches = list(dm.train_dataloader())
    # one sample more than a pass holds: the epoch reads past gone.tar into the next pass (img0 first)
    assert good_keys(batches) == sorted(image_key(data / "part-0.tar", f"img{i}") for i in [*GOOD, 0])
    assert counts_of(batches) == EXPECTED


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """Two shards with a `train.json` index of 4 samples each; one tar is cut exactly where its third sample
    begins (`tarfile` reads it as a shorter tar without its end-of-archive marker), the other is whole."""
    root = tmp_path_factory.mktemp("indexed")
    write_vocab(root / "vocab.txt")
    for shard in range(2):
        write_shard(root / f"train-{shard:06d}.tar", [sample(4 * shard + i) for i in range(4)])
    index = {"shards": [{"name": f"train-{i:06d}.tar", "samples": 4} for i in range(2)], "samples": 8}
    (root / "train.json").write_text(json.dumps(index))
    cut = root / "train-000001.tar"
    with tarfile.open(cut) as tar:
        third = next(m for m in tar.getmembers() if m.name.startswith("s00006."))
    cut.write_bytes(cut.read_bytes()[: third.offset])
    return root


@pytest.mark.parametrize(
    "spec", ["{root}", "{root}/train-{{000000..000001}}.tar", "{root}/./train-*.tar", "{url}/train.json"]
)
def test_shard_shorter_than_its_index_counts_the_missing_samples(indexed, spec):
    with serving(indexed) as url:
        shards = spec.format(root=indexed, url=url)
        dm = MultiViewDataModule(shards, str(indexed / "vocab.txt"), val_shards=shards, val_split="train",
                                 image_size=32, batch_size=4, num_workers=0, epoch_samples=6)
        batches = list(dm.val_dataloader())
        counts = counts_of(batches)
        assert counts == {**dict.fromkeys(SKIP_REASONS, 0), "bad_tar": 1, "short_shard": 2}, counts
        folder = url if spec.startswith("{url}") else indexed
        assert good_keys(batches) == sorted(image_key(f"{folder}/train.tar", f"img{i}") for i in range(6))


@pytest.mark.parametrize("damage", ["cut at a member", "cut inside a member", "damaged header"])
def test_a_damaged_shard_without_index_counts_a_bad_tar(tmp_path, damage):
    """`tarfile` takes a missing or damaged header past the first member for the end of the archive: the
    rest of the shard would be lost without a count."""
    write_vocab(tmp_path / "vocab.txt")
    shard = tmp_path / "train-000000.tar"
    write_shard(shard, [sample(i) for i in range(4)])
    with tarfile.open(shard) as tar:
        third = next(m for m in tar.getmembers() if m.name.startswith("s00002."))
    data = bytearray(shard.read_bytes())
    if damage == "cut at a member":
        data = data[: third.offset]
    elif damage == "cut inside a member":
        data = data[: third.offset_data + 10]
    else:
        data[third.offset : third.offset + 100] = b"\x17" * 100
    shard.write_bytes(bytes(data))
    dm = MultiViewDataModule(str(shard), str(tmp_path / "vocab.txt"), val_shards=str(shard),
                             image_size=32, batch_size=4, num_workers=0, epoch_samples=4)
    batches = list(dm.val_dataloader())
    assert counts_of(batches)["bad_tar"] == 1
    assert len(good_keys(batches)) == 2  # the samples before the damage are kept


def test_a_whole_shard_counts_nothing(tmp_path):
    write_vocab(tmp_path / "vocab.txt")
    shard = tmp_path / "train-000000.tar"
    write_shard(shard, [sample(i) for i in range(4)])
    dm = MultiViewDataModule(str(shard), str(tmp_path / "vocab.txt"), val_shards=str(shard),
                             image_size=32, batch_size=4, num_workers=0, epoch_samples=4)
    batches = list(dm.val_dataloader())
    assert counts_of(batches) == dict.fromkeys(SKIP_REASONS, 0)
    assert len(good_keys(batches)) == 4


def test_broken_index_is_a_clear_error(tmp_path):
    write_vocab(tmp_path / "vocab.txt")
    write_shard(tmp_path / "train-000000.tar", [sample(0)])
    (tmp_path / "train.json").write_text('{"shards": [{"samples": 1}]}')
    with pytest.raises(ValueError, match=r"train\.json: not a shard index \(KeyError"):
        MultiViewDataModule(str(tmp_path / "train-*.tar"), str(tmp_path / "vocab.txt"), epoch_samples=1)


def test_image_limit_is_configurable(data):
    shards = str(data / "shards.txt")
    dm = _shard_gone_after_start(data, train_shards=shards, vocab_file=str(data / "vocab.txt"),
                                 val_shards=shards, image_size=32, batch_size=4, num_workers=0,
                                 epoch_samples=8)
    batches = list(dm.val_dataloader())
    assert counts_of(batches)["image_too_large"] == 1
    assert len(good_keys(batches)) == len(GOOD) + 1


def test_skip_counts_reach_the_training_modules_logs(data):
    """Validation through `ErnieVil2Module`: every skip of every reason reaches `val/skipped_<reason>`."""
    shards = str(data / "shards.txt")
    dm = _shard_gone_after_start(data, train_shards=shards, vocab_file=str(data / "vocab.txt"),
                                 val_shards=shards, image_size=32, batch_size=2, num_workers=0,
                                 epoch_samples=8, max_image_pixels=MAX_PIXELS,
                                 text_max_len=TINY["text"]["max_position_embeddings"])
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    (metrics,) = trainer.validate(ErnieVil2Module(tiny_model()), datamodule=dm, verbose=False)
    prefix = "val/skipped_"
    skipped = {k.removeprefix(prefix): int(v) for k, v in metrics.items() if k.startswith(prefix)}
    assert skipped == EXPECTED
    assert "val/loss_image_caption" in metrics  # the good samples were validated


def test_shards_with_no_usable_sample_stop_with_a_clear_error(tmp_path):
    """Virtual epochs repeat a worker's shards until it has its batches: with nothing decodable that would
    never end, so the pass that makes no batch stops the stream with an error instead."""
    write_vocab(tmp_path / "vocab.txt")
    write_shard(tmp_path / "train-000000.tar", [broken(i, jpg=b"\x00not an image" * 20) for i in range(6)])
    dm = MultiViewDataModule(train_shards=str(tmp_path / "train-000000.tar"),
                             vocab_file=str(tmp_path / "vocab.txt"), image_size=32, batch_size=2,
                             num_workers=0, epoch_samples=8)
    with pytest.raises(NoUsableSample, match="gave no usable sample"):
        list(dm.train_dataloader())


def _resampled(train_shards: str, vocab: str, **kw: object) -> MultiViewDataModule:
    args = {"image_size": 32, "batch_size": 2, "num_workers": 0, "epoch_samples": 64, "resampled": True}
    return MultiViewDataModule(train_shards=train_shards, vocab_file=vocab, **{**args, **kw})


@pytest.mark.parametrize("content", ["random_bytes", "undecodable_images"])
def test_resampled_shards_with_no_usable_sample_stop_after_bounded_draws(tmp_path, content: str) -> None:
    """Resampling never ends a pass, so the draws themselves are bounded: a corrupt tar (no sample at all)
    or a valid tar of undecodable images stops the stream with the error instead of drawing forever."""
    write_vocab(tmp_path / "vocab.txt")
    shard = tmp_path / "train-000000.tar"
    if content == "random_bytes":
        shard.write_bytes(random.Random(0).randbytes(10_240))
    else:
        write_shard(shard, [broken(i, jpg=b"\x00not an image" * 20) for i in range(6)])
    dm = _resampled(str(shard), str(tmp_path / "vocab.txt"))
    error = error_within(lambda: list(dm.train_dataloader()), seconds=60)
    limit = epochs.barren_draw_limit(1)
    assert error == (f"NoUsableSample: train_shards: {limit} shards drawn in a row gave no usable sample "
                     "(every shard corrupt, or no sample with an image and a caption)")


def test_resampled_draws_are_counted_from_the_last_usable_sample(tmp_path, monkeypatch) -> None:
    """With a limit of 6 draws, an epoch of many more draws, a quarter of them of a corrupt shard, still runs:
    every usable sample starts the count again. The corrupt shard alone stops at the limit."""
    monkeypatch.setattr(epochs, "BARREN_DRAWS_MIN", 6)
    monkeypatch.setattr(epochs, "BARREN_DRAWS_PER_SHARD", 0)
    assert epochs.barren_draw_limit(40) == 6
    vocab = str(write_vocab(tmp_path / "vocab.txt"))
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(random.Random(1).randbytes(10_240))
    good = [str(write_shard(tmp_path / f"good-{i}.tar", [sample(i)])) for i in range(3)]
    dm = _resampled([*good, str(garbage)], vocab, epoch_samples=80, shuffle_buffer=0)
    batches = list(dm.train_dataloader())
    assert len(batches) == 40
    assert counts_of(batches)["bad_tar"] > 6  # more bad draws than the limit, never 7 in a row
    alone = _resampled(str(garbage), vocab)
    error = error_within(lambda: list(alone.train_dataloader()), seconds=60)
    assert error.startswith("NoUsableSample: train_shards: 6 shards drawn in a row gave no usable sample")
