"""MultiViewDataModule: shard folders, virtual epochs, rank/worker splitting, batch format, errors."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import signal
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ernievil2_train.config_checks import ConfigError
from ernievil2_train.data.batches import SKIPPED_KEY, normalize_batch
from ernievil2_train.data.datamodule import MultiViewDataModule, unknown_share
from ernievil2_train.data.decode import SKIP_REASONS
from ernievil2_train.data.epochs import STREAM_READ_KEY, stream_samples
from ernievil2_train.data.sources import resolve_shards
from ernievil2_train.data.views import SampleTransform
from tests.data.shard_helpers import (
    CHARS,
    PER_SHARD,
    image_key,
    sample,
    serving,
    write_shard,
    write_split,
    write_vocab,
)

SIZE = 32
SHARDS = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_vocab(root / "vocab.txt")
    write_split(root, "train", SHARDS, 0)
    write_split(root, "val", 2, 1000)
    return root


def module(data, **kw):
    args = {"train_shards": str(data), "vocab_file": str(data / "vocab.txt"), "image_size": SIZE,
            "batch_size": 4, "num_workers": 0, "shuffle_buffer": 50}
    return MultiViewDataModule(**{**args, **kw})


def keys_of(ids, folder, split="train"):
    """Image keys of images `img{i}` of split `split` in `folder` (a local folder or a served url)."""
    return {image_key(f"{folder}/{split}-000000.tar", f"img{i}") for i in ids}


@pytest.fixture(scope="module")
def served(data):
    with serving(data) as url:
        yield url


def test_an_index_url_streams_its_shards_over_http(data, served):
    urls, total, sizes = resolve_shards(f"{served}/train.json", "train", "train_shards")
    assert urls == [f"{served}/train-{s:06d}.tar" for s in range(SHARDS)]
    assert total == PER_SHARD * SHARDS and sizes == dict.fromkeys(urls, PER_SHARD)
    dm = module(data, train_shards=f"{served}/train.json", val_shards=f"{served}/val.json")
    assert dm.epoch_samples == PER_SHARD * SHARDS
    keys = torch.cat([b["image_key"] for b in dm.val_dataloader()])
    assert sorted(keys.tolist()) == sorted(keys_of(range(1000, 1000 + 2 * PER_SHARD), served, "val"))
    missing = r"train_shards: cannot read shard index http:.*/nope\.json .*404"
    with pytest.raises(FileNotFoundError, match=missing):
        resolve_shards(f"{served}/nope.json", "train", "train_shards")
    with pytest.raises(ValueError, match=r"train_shards: a shard index is read from a local file or an http"):
        resolve_shards("s3://bucket/train.json", "train", "train_shards")


def test_clear_errors(data, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train_shards: no shards match .*nope-\{0\.\.3\}\.tar"):
        module(data, train_shards=str(tmp_path / "nope-{0..3}.tar"))
    with pytest.raises(FileNotFoundError, match=r"train_shards: no train-\*\.tar shards in directory"):
        module(data, train_shards=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"vocab_file: .*missing\.txt not found"):
        module(data, vocab_file=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match=r"views\.text_view"):
        module(data, views={"text_view": "nonsense"})
    with pytest.raises(ValueError, match=r"train_shards: 4 shard\(s\) for 1 rank\(s\) x 5 worker\(s\)"):
        module(data, num_workers=5).train_dataloader()  # outside a trainer's `setup`
    few = module(data, num_workers=3)
    few.trainer = SimpleNamespace(global_rank=0, world_size=5)
    few.setup("fit")
    with pytest.raises(ValueError, match=r"train_shards: 4 shard\(s\) for 5 rank\(s\) x 3 worker\(s\)"):
        few.train_dataloader()


def test_a_few_shards_train_with_as_many_workers_as_they_give_each_rank(data, caplog):
    """Each worker reads whole shards: with fewer shards than workers, `setup` lowers the worker count to
    what the shards give every rank, and the epoch still trains every batch it should."""
    assert SHARDS == 4
    for world_size, workers, expected in ((1, 8, 4), (2, 8, 2), (2, 1, 1), (1, 0, 0), (3, 2, 1)):
        dm = module(data, num_workers=workers)
        dm.trainer = SimpleNamespace(global_rank=0, world_size=world_size)
        with caplog.at_level(logging.INFO, logger="ernievil2_train.data.datamodule"):
            dm.setup("fit")
        assert dm.num_workers == expected
        lowered = f"loading with {expected} worker(s) per rank instead of num_workers={workers}"
        assert (lowered in caplog.text) == (expected != workers)
        caplog.clear()
    dm = module(data, num_workers=8, persistent_workers=False)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == dm.batches_per_worker(1) * 4


def test_patterns_over_indexed_shards_know_their_sample_count(data, tmp_path):
    """A brace pattern, glob or list over shards that the `{split}.json` beside them lists counts their
    samples, so `epoch_samples` defaults to it; with a shard the index does not list the count is unknown."""
    one = str(data / "train-{000000..000000}.tar")
    assert resolve_shards(one, "train", "k").samples == PER_SHARD
    assert resolve_shards(str(data / "train-*.tar"), "train", "k").samples == PER_SHARD * SHARDS
    assert module(data, train_shards=one).epoch_samples == PER_SHARD
    partial = tmp_path / "partial"
    partial.mkdir()
    write_split(partial, "train", 2, 0, indexed=1)
    pattern = str(partial / "train-{000000..000001}.tar")
    shards = resolve_shards(pattern, "train", "k")
    assert shards.samples is None and shards.sizes == {os.path.realpath(shards.urls[0]): PER_SHARD}
    assert resolve_shards(str(partial / "train-000000.tar"), "train", "k").samples == PER_SHARD
    with pytest.raises(ValueError, match=r"epoch_samples: set it to a positive number .*train-\{000000"):
        module(data, train_shards=pattern)
    assert module(data, train_shards=pattern, epoch_samples=12).epoch_samples == 12


def test_a_folder_gives_its_only_validation_split_whatever_its_name(data, tmp_path, caplog):
    """Recipes write Chinese-CLIP's validation split as `valid`: a folder without `val` shards gives its only
    other validation split (`valid`, `validation`) and logs which; with two, or none, a one-line error names
    what the folder holds. A training split has no other names."""
    folder = tmp_path / "cococn"
    folder.mkdir()
    write_split(folder, "valid", 2, 1000)
    with caplog.at_level(logging.INFO, logger="ernievil2_train.data.sources"):
        dm = module(data, val_shards=str(folder))
    assert [Path(url).name for url in dm.val_urls] == ["valid-000000.tar", "valid-000001.tar"]
    assert all(dm.shard_sizes[os.path.realpath(url)] == PER_SHARD for url in dm.val_urls)
    assert f"val_shards: directory {folder} has no val split, reading its valid split" in caplog.text
    keys = torch.cat([b["image_key"] for b in dm.val_dataloader()])
    assert sorted(keys.tolist()) == sorted(keys_of(range(1000, 1000 + 2 * PER_SHARD), folder, "valid"))
    assert resolve_shards(str(folder), "valid", "k") == resolve_shards(str(folder), "val", "k")
    no_train = f"train_shards: no train-*.tar shards in directory {folder} (it holds valid-*.tar)"
    with pytest.raises(FileNotFoundError, match=re.escape(no_train)):
        module(data, train_shards=str(folder))

    write_split(folder, "validation", 1, 2000)
    two = (f"val_shards: no val split in directory {folder} but valid and validation; set val_shards to the "
           f"one to read: {folder}/valid.json or {folder}/validation.json")
    with pytest.raises(FileNotFoundError, match=re.escape(two)):
        module(data, val_shards=str(folder))
    chosen = module(data, val_shards=str(folder), val_split="validation")
    assert chosen.val_urls == [str(folder / "validation-000000.tar")]

    other = tmp_path / "other"
    other.mkdir()
    write_split(other, "test", 1, 0)
    write_split(other, "train", 1, 0)
    none = f"val_shards: no val-*.tar shards in directory {other} (it holds test-*.tar, train-*.tar)"
    with pytest.raises(FileNotFoundError, match=re.escape(none)):
        module(data, val_shards=str(other))


def test_one_epoch_sees_every_sample_once_with_the_agreed_batch_format(data):
    loader = module(data).train_dataloader()
    assert len(loader) == PER_SHARD * SHARDS // 4
    batches = list(loader)
    assert len(batches) == len(loader)
    assert batches[0]["image"].dtype == torch.uint8
    batch = module(data).on_after_batch_transfer(batches[0], 0)
    assert batch["image"].shape == batch["image_view2"].shape == (4, 3, SIZE, SIZE)
    assert batch["image"].dtype == batch["image_view2"].dtype == torch.float32
    text_len = batch["caption_ids"].shape[1]
    assert text_len % 8 == 0 and text_len < 48  # cut to the longest real row, not the padded 48
    for name in ("caption_ids", "text_view_ids", "tag_ids"):
        assert batch[name].shape == (4, text_len) and batch[name].dtype == torch.long
    last_block = torch.cat([batch[n][:, -8:] for n in ("caption_ids", "text_view_ids", "tag_ids")])
    assert (last_block != 0).any()  # no whole block of 8 pad columns is left
    assert batch["has_tags"].dtype == torch.bool and batch["has_tags"].shape == (4,)
    assert batch["image_key"].dtype == torch.long and batch["caption_key"].shape == (4,)
    assert batch[SKIPPED_KEY].shape == (len(SKIP_REASONS),) and batch[SKIPPED_KEY].dtype == torch.long
    seen = torch.cat([b["image_key"] for b in batches]).tolist()
    assert sorted(seen) == sorted(keys_of(range(PER_SHARD * SHARDS), data))


def test_virtual_epochs_are_fixed_length_and_repeat_the_stream(data):
    loader = module(data, epoch_samples=80, batch_size=6, num_workers=2).train_dataloader()
    assert len(loader) == 14  # ceil((80 // 6) / 2) batches per worker, 2 workers
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == 14 and all(b["image"].shape[0] == 6 for b in batches)
        keys = torch.cat([b["image_key"] for b in batches]).tolist()
        assert set(keys) <= keys_of(range(32), data) and len(set(keys)) < len(keys)


def test_ranks_get_equal_batches_and_disjoint_shards(data, monkeypatch):
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = module(data)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        loader = dm.train_dataloader()
        assert len(loader) == PER_SHARD * SHARDS // (4 * 2)
        batches = list(loader)
        assert len(batches) == len(loader)
        seen.append(set(torch.cat([b["image_key"] for b in batches]).tolist()))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == keys_of(range(PER_SHARD * SHARDS), data)


def test_ranks_split_shards_by_the_trainer_rank_inside_loader_workers(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning's launchers set WORLD_SIZE but not RANK, and a loader worker has no process group: the
    trainer's rank alone must split the shards, or every rank reads all of them."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = []
    for rank in (0, 1):
        dm = module(data, num_workers=2, persistent_workers=False)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        batches = list(dm.train_dataloader())
        keys = torch.cat([b["image_key"] for b in batches]).tolist()
        assert len(batches) == 4 and len(set(keys)) == len(keys)
        seen.append(set(keys))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == keys_of(range(PER_SHARD * SHARDS), data)


def test_resampled_stream_runs_with_more_workers_than_shards(data):
    loader = module(data, train_shards=str(data / "train-000000.tar"), epoch_samples=24, resampled=True,
                    num_workers=2, persistent_workers=False).train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 6
    assert set(torch.cat([b["image_key"] for b in batches]).tolist()) <= keys_of(range(PER_SHARD), data)


def test_workers_reading_the_same_samples_augment_them_differently(data: Path) -> None:
    """Two workers drawing the one shard give its samples in the same order, each with its own views."""
    loader = module(data, train_shards=str(data / "train-000000.tar"), epoch_samples=2 * PER_SHARD,
                    batch_size=PER_SHARD, resampled=True, shuffle_buffer=0, num_workers=2,
                    persistent_workers=False).train_dataloader()
    first, second = list(loader)
    assert torch.equal(first["image_key"], second["image_key"])
    for key in ("image", "image_view2"):
        assert all(not torch.equal(a, b) for a, b in zip(first[key], second[key], strict=True))


def _same_batches(a: list[dict], b: list[dict]) -> bool:
    keys = ("image_key", "image", "image_view2", "text_view_ids")
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in keys)


class Recorder(L.LightningModule):
    """Trains one scalar; records every batch it trains on, by epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[dict]] = {}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.setdefault(self.current_epoch, []).append({k: v.clone() for k, v in batch.items()})
        return (self.weight * batch["image"].float().mean()).sum()

    def configure_optimizers(self) -> dict:
        # as ErnieVil2Module's schedule: asking for the run's steps makes Lightning build the training
        # iterator here, before a resumed run's loop state is restored
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        total = self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / (total + 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _fit(datamodule, epochs: int, ckpt_dir, ckpt_path=None) -> Recorder:
    model = Recorder()
    savers = [ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1),  # epoch=E-step=S.ckpt at epoch ends
              ModelCheckpoint(dirpath=ckpt_dir, filename="mid-{step}", save_top_k=-1, every_n_train_steps=3)]
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=savers, accelerator="cpu", devices=1)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize(("resampled", "persistent"), [(False, True), (True, False)])
def test_a_resumed_run_reads_what_the_uninterrupted_run_reads(data, tmp_path, resampled, persistent):
    """Shard order, sample order and augmentations depend on (seed, epoch) only, and a resumed run skips the
    batches its epoch already trained: from an epoch-end or a mid-epoch checkpoint, every later batch (keys,
    pixels, text views) is the uninterrupted run's."""
    settings = {"num_workers": 2, "persistent_workers": persistent, "resampled": resampled,
                "shuffle_buffer": 8, "shard_shuffle": 4, "seed": 3, "epoch_samples": 32}
    full = _fit(module(data, **settings), 3, tmp_path / "full")  # 8 batches per epoch
    assert not _same_batches(full.seen[0], full.seen[1])
    saved = tmp_path / "full"
    at_epoch_end = _fit(module(data, **settings), 3, tmp_path / "a", saved / "epoch=0-step=8.ckpt")
    assert sorted(at_epoch_end.seen) == [1, 2]
    assert all(_same_batches(at_epoch_end.seen[e], full.seen[e]) for e in (1, 2))
    mid_epoch = _fit(module(data, **settings), 2, tmp_path / "b", saved / "mid-step=12.ckpt")
    assert _same_batches(mid_epoch.seen[1], full.seen[1][4:])
    # 1 batch done: the loader's worker 0 takes up the stream whose turn it is, so the order is kept too
    odd = _fit(module(data, **settings), 2, tmp_path / "d", saved / "mid-step=9.ckpt")
    assert _same_batches(odd.seen[1], full.seen[1][1:])
    # resumed again in the same epoch, from the resumed run's checkpoint 4 batches into it
    twice = _fit(module(data, **settings), 2, tmp_path / "e", tmp_path / "d" / "mid-step=12.ckpt")
    assert _same_batches(twice.seen[1], full.seen[1][4:])
    other_seed = _fit(module(data, **{**settings, "seed": 4}), 1, tmp_path / "c")
    assert not _same_batches(other_seed.seen[0], full.seen[0])


@pytest.mark.parametrize(("change", "refused"), [
    ({"batch_size": 8}, r"'data.datamodule.batch_size': 8, but 4 in the checkpoint being resumed"),
    ({"num_workers": 1}, r"'data.datamodule.num_workers \(loader workers in use\)': 1, but 2 in"),
    ({"epoch_samples": 48}, r"'data.datamodule.epoch_samples': 48, but 32 in"),
    ({"seed": 4}, r"'data.datamodule.seed': 4, but 3 in"),
    ({"train_shards": "train-00000{0..1}.tar"}, r"'data.datamodule.train_shards': other shards than the"),
])
def test_an_epoch_is_resumed_only_as_it_was_laid_out(data, tmp_path, change, refused):
    """The rest of an epoch is read from where its streams stood: with another batch size the restored batch
    count would end the epoch early (or run it on), with other workers, shards or seeds it would skip the
    wrong samples. Refused for a mid-epoch checkpoint; one saved at an epoch's end starts the next epoch as
    the new settings lay it out."""
    settings = {"num_workers": 2, "persistent_workers": False, "shuffle_buffer": 8, "seed": 3,
                "epoch_samples": 32}
    if "train_shards" in change:  # two of the four shards, one for each worker
        change = {"train_shards": str(data / change["train_shards"])}
    _fit(module(data, **settings), 1, tmp_path / "full")  # 8 batches
    saved = tmp_path / "full"
    with pytest.raises(ConfigError, match=rf"^config key {refused}.* stopped within an epoch: the rest of"):
        _fit(module(data, **{**settings, **change}), 2, tmp_path / "a", saved / "mid-step=6.ckpt")
    resumed = _fit(module(data, **{**settings, **change}), 2, tmp_path / "b", saved / "epoch=0-step=8.ckpt")
    assert sorted(resumed.seen) == [1]


def test_a_checkpoint_of_an_epochs_last_batch_resumes_only_as_the_epoch_was_laid_out(data, tmp_path):
    """Saved after an epoch's last batch, before its end (an interruption during its validation): Lightning
    counts the batches trained and, with more batches to an epoch, would train on in that epoch. Refused with
    another batch size, as within the epoch; with the same settings the epoch ends and the next one is the
    uninterrupted run's. The refusal can be told before training: `check_resumable` on the saved state."""
    settings = {"num_workers": 2, "persistent_workers": False, "shuffle_buffer": 8, "seed": 3,
                "epoch_samples": 24}
    full = _fit(module(data, **settings), 2, tmp_path / "full")  # 6 batches an epoch: mid-step=6 is the last
    last_batch = tmp_path / "full" / "mid-step=6.ckpt"
    state = torch.load(last_batch, weights_only=False)["MultiViewDataModule"]
    assert state["mid_epoch"]
    assert state["vocab_file"] == str((data / "vocab.txt").resolve())  # what the export copies without one
    with pytest.raises(ConfigError, match=r"^config key 'data.datamodule.batch_size': 2, but 4 in the "):
        module(data, **{**settings, "batch_size": 2}).check_resumable(state, 1)
    with pytest.raises(ConfigError, match=r"'data.datamodule.batch_size': 2, but 4 .* stopped within an"):
        _fit(module(data, **{**settings, "batch_size": 2}), 2, tmp_path / "a", last_batch)
    resumed = _fit(module(data, **settings), 2, tmp_path / "b", last_batch)
    assert sorted(resumed.seen) == [1]
    assert _same_batches(resumed.seen[1], full.seen[1])
    epoch_end = torch.load(tmp_path / "full" / "epoch=0-step=6.ckpt", weights_only=False)
    module(data, **{**settings, "batch_size": 2}).check_resumable(epoch_end["MultiViewDataModule"], 1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_pass_leaves_torchs_random_generator_alone(data, num_workers):
    """A DataLoader draws its workers' base seed from torch's global generator at every pass unless it has
    its own; then a resumed run, starting its pass at another moment, would draw other dropout masks."""
    dm = module(data, val_shards=str(data), num_workers=num_workers, persistent_workers=False,
                epoch_samples=16)
    before = torch.get_rng_state()
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        next(iter(loader))
    assert torch.equal(torch.get_rng_state(), before)


def test_loader_workers_leave_stop_signals_to_the_main_process(data):
    """A scheduler's SIGTERM (and a terminal's Ctrl-C) reach the whole process group: the workers go on
    serving batches until the main process, which saves and stops, shuts them down."""
    batches = iter(module(data, num_workers=1, persistent_workers=False, epoch_samples=16).train_dataloader())
    next(batches)
    workers = multiprocessing.active_children()
    assert len(workers) == 1
    for signum in (signal.SIGTERM, signal.SIGINT):
        os.kill(workers[0].pid, signum)
    time.sleep(0.5)
    assert workers[0].is_alive()
    assert len(list(batches)) == 3


def test_an_epoch_rounded_to_whole_batches_says_so(data, caplog):
    with caplog.at_level(logging.INFO, logger="ernievil2_train.data.datamodule"):
        batches = list(module(data, batch_size=3, epoch_samples=16).train_dataloader())
    assert len(batches) == 5
    assert "an epoch trains 15 samples: epoch_samples=16 rounded to 5 batches of 3" in caplog.text


@pytest.mark.parametrize(("sizes", "workers", "warned"), [
    ((4, 4, 2), 2, "4 to 6 samples, and each takes 6"), ((4, 4), 2, None), ((4, 4, 2), 1, None),
    ((100, 97), 2, "97 to 100 samples, and each takes 98"), ((100, 99), 2, None),
])
def test_streams_of_unequal_samples_are_warned_about(tmp_path, caplog, sizes, workers, warned):
    """Each worker reads whole shards and takes the same number of samples an epoch: with 4 + 2 and 4
    samples, one repeats samples within the epoch and the other leaves some out. Streams within 2% of each
    other (a few samples a recipe skipped) are not worth a warning."""
    write_vocab(tmp_path / "vocab.txt")
    entries = []
    for s, size in enumerate(sizes):
        name = f"train-{s:06d}.tar"
        write_shard(tmp_path / name, [sample(10 * s + i) for i in range(size)])
        entries.append({"name": name, "samples": size})
    index = {"split": "train", "samples": sum(sizes), "shards": entries}
    (tmp_path / "train.json").write_text(json.dumps(index))
    dm = MultiViewDataModule(str(tmp_path), str(tmp_path / "vocab.txt"), image_size=SIZE, batch_size=2,
                             num_workers=workers, persistent_workers=False)
    with caplog.at_level(logging.WARNING, logger="ernievil2_train.data.datamodule"):
        dm.train_dataloader()
    if warned:
        assert f"the 2 loader streams (ranks x workers) read shards holding {warned}" in caplog.text
    else:
        assert "loader streams" not in caplog.text


def test_stream_samples_follow_the_shard_split() -> None:
    assert stream_samples([50, 50, 20], world=1, workers=2) == [70, 50]
    assert stream_samples([5, 6, 7, 8], world=2, workers=2) == [5, 7, 6, 8]


def test_resuming_mid_epoch_decodes_only_the_remaining_samples(data, tmp_path, monkeypatch):
    settings = {"num_workers": 0, "shuffle_buffer": 8, "epoch_samples": 32}
    full = _fit(module(data, **settings), 2, tmp_path / "full")
    decoded = []
    transform = SampleTransform.__call__
    monkeypatch.setattr(SampleTransform, "__call__", lambda self, s: decoded.append(s) or transform(self, s))
    resumed = _fit(module(data, **settings), 2, tmp_path / "a", tmp_path / "full" / "mid-step=12.ckpt")
    assert len(decoded) == 4 * 4  # the 4 remaining batches of 4, not the 4 trained ones too
    assert _same_batches(resumed.seen[1], full.seen[1][4:])


@pytest.fixture(scope="module")
def corrupt_data(tmp_path_factory):
    """4 shards of 8 samples; in each, samples 1 and 2 have an undecodable image."""
    root = tmp_path_factory.mktemp("corrupt_shards")
    write_vocab(root / "vocab.txt")
    for s in range(SHARDS):
        samples = [sample(s * PER_SHARD + i) for i in range(PER_SHARD)]
        for i in (1, 2):
            samples[i]["jpg"] = b"not a jpeg"
        write_shard(root / f"train-{s:06d}.tar", samples)
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_samples_skipped_before_a_mid_epoch_checkpoint_do_not_shift_the_resumed_stream(corrupt_data, tmp_path,
                                                                                       workers):
    """The uninterrupted run skipped corrupt samples before the checkpoint; the resumed run still gives the
    rest of the epoch exactly (before, it dropped one full batch per batch trained and re-trained samples)."""
    settings = {"num_workers": workers, "shuffle_buffer": 8, "shard_shuffle": 4, "seed": 5,
                "epoch_samples": 24}
    full = _fit(module(corrupt_data, **settings), 2, tmp_path / "full")  # 6 batches of 4 per epoch
    resumed = _fit(module(corrupt_data, **settings), 2, tmp_path / "a", tmp_path / "full" / "mid-step=9.ckpt")
    assert _same_batches(resumed.seen[1], full.seen[1][3:])
    state = torch.load(tmp_path / "full" / "mid-step=9.ckpt", weights_only=False)["MultiViewDataModule"]
    assert state["epoch"] == 1 and len(state["stream_read"]) == 1
    assert sum(state["stream_read"][0]) > 3 * 4  # corrupt samples were read besides the 12 trained


@pytest.fixture(scope="module")
def cut_data(tmp_path_factory):
    """4 indexed shards of 8 samples; shards 1 and 3 are cut where their sixth sample begins (each counts a
    bad_tar and 3 short_shard samples per pass)."""
    root = tmp_path_factory.mktemp("cut_shards")
    write_split(root, "train", SHARDS, 0)
    write_vocab(root / "vocab.txt")
    for s in (1, 3):
        shard = root / f"train-{s:06d}.tar"
        with tarfile.open(shard) as tar:
            sixth = tar.getmembers()[5 * len(tar.getmembers()) // PER_SHARD]
        shard.write_bytes(shard.read_bytes()[: sixth.offset])
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_counts_the_shards_it_reads_again_once(cut_data, tmp_path, workers):
    """A run resumed mid-epoch reads the epoch's shards again from their start to find its place: the bad
    tars and short shards it meets before that place were counted before the checkpoint already."""
    settings = {"num_workers": workers, "shuffle_buffer": 8, "shard_shuffle": 4, "seed": 5,
                "epoch_samples": 24}
    full = _fit(module(cut_data, **settings), 2, tmp_path / "full")  # 6 batches of 4 per epoch

    def skipped(batches: list[dict]) -> list[int]:
        return torch.stack([b[SKIPPED_KEY] for b in batches]).sum(0).tolist()

    epoch = skipped(full.seen[1])
    assert epoch[SKIP_REASONS.index("bad_tar")] > 0
    resumed = _fit(module(cut_data, **settings), 2, tmp_path / "a", tmp_path / "full" / "mid-step=9.ckpt")
    assert _same_batches(resumed.seen[1], full.seen[1][3:])
    before = skipped(full.seen[1][:3])
    assert [b + a for b, a in zip(before, skipped(resumed.seen[1]), strict=True)] == epoch


def test_a_checkpoint_gives_each_rank_its_own_streams_and_none_to_another_layout(data):
    """A rank takes its own row of the saved stream positions, only for the epoch it was saved in; a
    checkpoint of another number of ranks or workers gives none (the resume then drops whole batches)."""
    state = {"epoch": 3, "stream_read": [[10, 11], [20, 21]]}
    fit_loop = SimpleNamespace(epoch_loop=SimpleNamespace(
        batch_progress=SimpleNamespace(current=SimpleNamespace(processed=2))))
    for workers, rank, expected in ((2, 1, [20, 21]), (2, 0, [10, 11]), (3, 1, [-1, -1, -1])):
        dm = module(data, num_workers=workers)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, fit_loop=fit_loop, current_epoch=3,
                                     limit_train_batches=1.0)
        dm.load_state_dict(state)
        assert dm._position(8) == (3, 2, expected)
        dm.trainer.current_epoch = 4
        assert dm._position(8) == (4, 2, [-1] * workers)


def test_without_a_trainer_each_pass_is_the_next_epoch(data):
    settings = {"num_workers": 0, "shuffle_buffer": 8, "shard_shuffle": 4, "epoch_samples": 16}
    loader = module(data, **settings).train_dataloader()
    first, second = list(loader), list(loader)
    again = module(data, **settings).train_dataloader()
    assert _same_batches(list(again), first) and _same_batches(list(again), second)
    assert not _same_batches(first, second)


def test_view_flags_reach_the_batch(data):
    views = {"image_view2": False, "tags": False, "text_view": "none"}
    dm = module(data, views=views)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "caption_ids", "image_key", "caption_key", SKIPPED_KEY, STREAM_READ_KEY}
    assert set(dm.on_before_batch_transfer(batch, 0)) == set(batch) - {STREAM_READ_KEY}


def test_val_loader_is_one_deterministic_single_view_pass(data):
    dm = module(data, val_shards=str(data), val_batch_size=5, num_workers=2)
    first = list(dm.val_dataloader())
    assert [b["image"].shape[0] for b in first] in ([5, 3, 5, 3], [5, 5, 3, 3], [5, 5, 5, 1])
    assert set(first[0]) == {"image", "caption_ids", "tag_ids", "has_tags", "tags_key", "image_key",
                             "caption_key", SKIPPED_KEY}
    keys = torch.cat([b["image_key"] for b in first])
    assert sorted(keys.tolist()) == sorted(keys_of(range(1000, 1000 + 2 * PER_SHARD), data, "val"))
    second = {k: img for b in dm.val_dataloader()
              for k, img in zip(b["image_key"].tolist(), b["image"], strict=True)}
    for b in first:
        for k, img in zip(b["image_key"].tolist(), b["image"], strict=True):
            assert torch.equal(second[k], img)
    assert module(data).val_dataloader() == []


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_validate_disjoint_shares_of_the_val_shards(
    data: Path, monkeypatch: pytest.MonkeyPatch, num_workers: int
) -> None:
    """As in training, the trainer's rank splits the validation shards (WORLD_SIZE set, RANK not, as under
    Lightning's launchers), and the loader workers split a rank's share again: each sample once in all."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = []
    for rank in (0, 1):
        dm = module(data, val_shards=str(data / "train-*.tar"), num_workers=num_workers, val_batch_size=3,
                    persistent_workers=False)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        keys = torch.cat([b["image_key"] for b in dm.val_dataloader()]).tolist()
        assert len(keys) == len(set(keys)) == 2 * PER_SHARD
        seen.append(set(keys))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == keys_of(range(PER_SHARD * SHARDS), data)


def test_a_rank_without_a_val_shard_gets_no_batch(data: Path) -> None:
    """One validation shard for two ranks: rank 0 validates it, rank 1 has nothing to read (the module's
    epoch-end reduction does not depend on a rank having batches)."""
    sizes = []
    for rank in (0, 1):
        dm = module(data, val_shards=str(data / "val-000000.tar"))
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        sizes.append([len(batch["image"]) for batch in dm.val_dataloader()])
    assert sizes == [[4, 4], []]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_val_worker_without_a_batch_still_reports_its_skips(tmp_path: Path, num_workers: int) -> None:
    """Skips travel on batches; a loader worker whose samples were all skipped (here, with 2 workers, the
    one reading the all-corrupt shard) gives one batch of skip counts only, so every skip is reported."""
    write_vocab(tmp_path / "vocab.txt")
    corrupt = [{**sample(100 + i), "jpg": b"not a jpeg"} for i in range(3)]
    write_shard(tmp_path / "val-000000.tar", [sample(i) for i in range(4)] + corrupt)
    write_shard(tmp_path / "val-000001.tar", corrupt)
    dm = module(tmp_path, train_shards=str(tmp_path / "val-*.tar"), val_shards=str(tmp_path / "val-*.tar"),
                num_workers=num_workers, persistent_workers=False, epoch_samples=4)
    batches = list(dm.val_dataloader())
    assert sum(len(batch["image"]) for batch in batches if "image" in batch) == 4
    assert sum(batch[SKIPPED_KEY] for batch in batches)[SKIP_REASONS.index("bad_image")] == 6
    skips_only = [set(batch) for batch in batches if "image" not in batch]
    assert skips_only == ([{SKIPPED_KEY}] if num_workers == 2 else [])


def test_uint8_transfer_then_normalize_equals_float_batches(data):
    as_uint8 = next(iter(module(data, val_shards=str(data)).val_dataloader()))
    as_float = next(iter(module(data, val_shards=str(data), uint8_transfer=False).val_dataloader()))
    assert as_uint8["image"].dtype == torch.uint8 and as_float["image"].dtype == torch.float32
    torch.testing.assert_close(normalize_batch(as_uint8)["image"], as_float["image"], atol=1e-5, rtol=0)


class DtypeProbe(L.LightningModule):
    """Records the image dtype its steps get, and uses the images in a layer of the trainer's dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.seen: set[torch.dtype] = set()
        self.validated = False

    def training_step(self, batch, batch_idx):
        self.seen.add(batch["image"].dtype)
        return self.layer(batch["image"].mean((2, 3))).float().sum()

    def validation_step(self, batch, batch_idx):
        self.validated = True
        self.training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("uint8_transfer", [True, False])
@pytest.mark.parametrize(("precision", "dtype"), [("bf16-true", torch.bfloat16), ("64-true", torch.float64),
                                                  ("32-true", torch.float32)])
def test_the_images_reach_the_steps_in_the_trainers_precision(data, uint8_transfer, precision, dtype):
    """uint8 images were normalised to float32 after Lightning's conversion of float inputs: the first
    step under a `-true` precision failed on a dtype mismatch."""
    probe = DtypeProbe()
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, val_check_interval=1, precision=precision,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(probe, datamodule=module(data, val_shards=str(data), uint8_transfer=uint8_transfer))
    assert probe.seen == {dtype} and probe.validated


@pytest.mark.parametrize("length", [1, 0, 2.5, True])
def test_a_text_length_without_room_for_cls_and_sep_is_refused_at_start(data, length):
    with pytest.raises(ValueError, match=rf"^text_max_len: must be an integer of at least 2 .*{length!r}$"):
        module(data, text_max_len=length)


@pytest.mark.parametrize("field", ["shuffle_buffer", "shard_shuffle"])
def test_a_negative_shuffle_size_is_refused(data, field):
    with pytest.raises(ValueError, match=rf"^{field} must be 0 \(no shuffling\) or more, got -5$"):
        module(data, **{field: -5})


@pytest.mark.parametrize(("field", "value", "message"), [
    ("image_size", 0, "image_size must be positive, got 0"),
    ("image_size", "64", "image_size: expected int, got '64'"),
    ("batch_size", "8", "batch_size: expected int, got '8'"),
    ("batch_size", True, "batch_size: expected int, got True"),
    ("max_image_pixels", 0, "max_image_pixels must be positive, got 0"),
    ("num_workers", 1.0, "num_workers: expected int, got 1.0"),
])
def test_sizes_that_are_not_counts_are_refused_by_name(data, field, value, message):
    """An image size of "64" or 0 was taken, then every sample was skipped as a bad image."""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        module(data, **{field: value})


def test_a_folder_given_as_vocabulary_is_named_as_a_folder(data):
    with pytest.raises(FileNotFoundError, match=r"^vocab_file: .* is a folder, not a vocabulary file$"):
        module(data, vocab_file=str(data))


def test_unknown_share_counts_word_pieces_only():
    vocab = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3, "a": 4}
    assert unknown_share(torch.tensor([[1, 3, 4, 3, 2, 0], [1, 4, 2, 0, 0, 0]]), vocab) == 0.5
    assert unknown_share(torch.tensor([[1, 2, 0]]), vocab) is None


@pytest.mark.parametrize(("chars", "warned"), [(CHARS, []), ("一只狗", ["caption", "object tag"])])
def test_a_first_batch_of_mostly_unknown_pieces_is_told_once(data, tmp_path, caplog, chars, warned):
    """A vocabulary without the captions' characters (another language's, another model's): one warning per
    text kind at the first batch, naming the vocab file; the data's own vocabulary: none."""
    vocab = write_vocab(tmp_path / "vocab.txt", chars)
    dm = module(data, vocab_file=str(vocab))
    batches = iter(dm.train_dataloader())
    with caplog.at_level(logging.WARNING, logger="ernievil2_train.data.datamodule"):
        for _ in range(2):
            dm.on_before_batch_transfer(next(batches), 0)
    said = [r.getMessage() for r in caplog.records if "[UNK]" in r.getMessage()]
    kinds = [what for what in ("caption", "object tag") if any(f"the {what} word" in m for m in said)]
    assert kinds == warned
    assert len(said) == len(warned)
    assert all(f"data.datamodule.vocab_file={vocab}:" in m for m in said)
