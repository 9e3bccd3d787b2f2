"""RetrievalCallback with a tiny real model and a real Lightning Trainer on CPU."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from ernievil2_train.callbacks.progress import LossProgressBar
from ernievil2_train.callbacks.retrieval import (
    RetrievalCallback,
    TrainingDiverged,
    cap_evalset,
    eval_mode,
    rank_slice,
)
from ernievil2_train.config_checks import ConfigError
from ernievil2_train.data.evalset import load_evalset
from ernievil2_train.evaluate import main as evaluate_main
from ernievil2_train.metrics.retrieval import any_positive, ernie_protocol
from ernievil2_train.text import ErnieTokenizer
from ernievil2_train.train import out_of_memory_error
from ernievil2_train.vision import eval_transform
from ernievil2_train.vision.transforms import EvalTransform
from tests.metrics.evalset_helpers import MAX_LEN, TINY, tiny_checkpoint, write_evalset

LOGGED = ["t2i/r@1", "t2i/r@5", "t2i/r@10", "i2t/r@1", "i2t/r@5", "i2t/r@10", "mean_recall"]


class TinyModule(pl.LightningModule):
    """Trains only the logit scale, so the encoders (and the retrieval numbers) stay fixed."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return (self.model.logit_scale - 1.0) ** 2 + 0 * batch.sum()

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD([self.model.logit_scale], lr=0.1)

    def train_dataloader(self):
        return DataLoader(torch.zeros(4, 1), batch_size=2)

    def val_dataloader(self):
        return DataLoader(torch.zeros(2, 1), batch_size=2)


def fit_one_epoch(model: torch.nn.Module, callback: RetrievalCallback, logger=False,
                  precision: str = "32-true", progress_bar: bool = False) -> pl.Trainer:
    bar = [LossProgressBar()] if progress_bar else []  # after the callback, as in conf/callbacks/default.yaml
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=logger, callbacks=[callback, *bar],
                         precision=precision, enable_progress_bar=progress_bar, enable_model_summary=False,
                         enable_checkpointing=False)
    trainer.fit(TinyModule(model))
    return trainer


@pytest.fixture
def setup(tmp_path):
    ckpt, model = tiny_checkpoint(tmp_path / "ckpt")
    texts, _, positives = write_evalset(tmp_path / "evalset")
    tokenizer = ErnieTokenizer(ckpt / "vocab.txt", max_len=MAX_LEN)
    transform = eval_transform(TINY["vision"]["image_size"])
    with torch.no_grad():
        text = model.encode_text(tokenizer(texts)["input_ids"])
        image = model.encode_image(
            torch.stack([transform(b) for b in load_evalset(tmp_path / "evalset").images])
        )
    expected = any_positive(F.normalize(text, dim=-1), F.normalize(image, dim=-1), positives, device="cpu")
    callback = RetrievalCallback(
        tmp_path / "evalset", vocab_file=ckpt / "vocab.txt", batch_size=4, max_len=MAX_LEN, progress=False
    )
    return model, callback, expected


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_logs_metrics_every_validation_epoch_and_at_start(tmp_path, setup):
    model, callback, expected = setup
    model.train()
    model.vision.eval()  # like a frozen tower: must stay in eval mode afterwards
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpts", monitor="retrieval/mean_recall", mode="max")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=CSVLogger(tmp_path / "logs"),
        callbacks=[callback, checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
    )
    trainer.fit(TinyModule(model))
    for key in LOGGED:
        assert trainer.callback_metrics[f"retrieval/{key}"].item() == pytest.approx(expected[key], rel=1e-6)
    assert checkpoint.best_model_score.item() == pytest.approx(expected["mean_recall"], rel=1e-6)
    rows = [r for r in read_csv(Path(trainer.logger.log_dir) / "metrics.csv") if r.get("retrieval/t2i/r@1")]
    assert len(rows) == 3  # zero-shot baseline + two epochs; the sanity check is skipped
    assert rows[0]["step"] == "0"
    for row in rows:
        for key in LOGGED:
            assert float(row[f"retrieval/{key}"]) == pytest.approx(expected[key], rel=1e-6)
    assert model.text.training and not model.vision.training


class NoValModule(TinyModule):
    val_dataloader = None
    validation_step = None


def test_runs_every_epoch_without_a_validation_set(tmp_path, setup):
    model, callback, expected = setup
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpts", monitor="retrieval/mean_recall", mode="max", save_on_train_epoch_end=True
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=CSVLogger(tmp_path / "logs"),
        callbacks=[callback, checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(NoValModule(model))
    rows = read_csv(Path(trainer.logger.log_dir) / "metrics.csv")
    assert len([r for r in rows if r.get("retrieval/mean_recall")]) == 3  # zero-shot baseline + two epochs
    assert checkpoint.best_model_score.item() == pytest.approx(expected["mean_recall"], rel=1e-6)


def count_crops(monkeypatch) -> list[int]:
    """How many images the eval transform crops (decodes), in this process."""
    calls = [0]
    crop = EvalTransform.crop

    def counted(self, image):
        calls[0] += 1
        return crop(self, image)

    monkeypatch.setattr(EvalTransform, "crop", counted)
    return calls


@pytest.mark.parametrize(("image_cache_mb", "decodes"), [(4096, 1), (0, 3)])
def test_eval_images_are_decoded_once_while_the_cache_holds_them(setup, monkeypatch, image_cache_mb, decodes):
    """The baseline and two epochs: one decode of each image with the cache, three without; same recall."""
    model, callback, expected = setup
    callback.image_cache_mb = image_cache_mb
    calls = count_crops(monkeypatch)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, callbacks=[callback],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(NoValModule(model))
    assert calls[0] == decodes * len(callback.evalset.images)
    assert callback.last == pytest.approx({k: expected[k] for k in callback.last}, rel=1e-6)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_evaluation_leaves_torchs_random_stream_alone(setup, num_workers):
    """Decoding (a loader draws its seed) or reading the cache, an evaluation takes nothing from the random
    stream that gives training its dropout masks: a resumed run, whose first evaluation decodes again,
    draws the masks the uninterrupted one drew."""
    model, callback, _ = setup
    callback.num_workers = num_workers
    fit_one_epoch(model, callback)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    for cached in (True, False):
        callback._crops = callback._crops if cached else None
        state = torch.random.get_rng_state()
        callback.evaluate(trainer, TinyModule(model))
        assert torch.equal(torch.random.get_rng_state(), state)


def test_the_cache_holds_its_own_copies_of_the_loader_workers_batches(setup):
    """A worker's batch lives in shared memory with a file descriptor open: the cache copies it out, or a
    cache of thousands of batches would run out of descriptors (and of /dev/shm)."""
    model, callback, expected = setup
    callback.num_workers = 1
    fit_one_epoch(model, callback)
    _, batches = callback._crops
    assert batches and not any(crops.is_shared() or ok.is_shared() for crops, ok in batches)
    assert callback.last == pytest.approx({k: expected[k] for k in callback.last}, rel=1e-6)


def test_eval_images_over_the_cache_size_are_decoded_each_time_and_said_once(tmp_path, monkeypatch, caplog):
    """700 crops of 3 x 32 x 32 bytes exceed 1 MiB: decoded at the baseline and again after the epoch."""
    ckpt, model = tiny_checkpoint(tmp_path / "ckpt")
    write_evalset(tmp_path / "evalset", num_images=700, num_texts=20)
    callback = RetrievalCallback(tmp_path / "evalset", vocab_file=ckpt / "vocab.txt", max_len=MAX_LEN,
                                 progress=False, image_cache_mb=1, batch_size=128)
    calls = count_crops(monkeypatch)
    with caplog.at_level(logging.INFO, logger="ernievil2_train.callbacks.retrieval"):
        fit_one_epoch(model, callback)
    assert calls[0] == 2 * 700
    said = [r.getMessage() for r in caplog.records if "image_cache_mb" in r.getMessage()]
    assert said == ["retrieval: the eval images take 2.1 MiB a rank decoded, over "
                    "callbacks.retrieval.image_cache_mb=1; they are decoded at every evaluation"]


def test_eval_mode_restores_each_module():
    net = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Dropout())
    net.train()
    net[1].eval()
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert net.training and net[0].training and not net[1].training


@pytest.mark.parametrize("n", [0, 1, 5, 47, 150])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_slices_have_one_length_and_cover_every_item_once(n, world):
    slices = [rank_slice(n, rank, world) for rank in range(world)]
    assert len({len(indices) for indices, _ in slices}) == 1
    real = [i for indices, count in slices for i in indices[:count]]
    assert sorted(real) == list(range(n))
    assert all(0 <= i < max(n, 1) for indices, _ in slices for i in indices)


def test_undecodable_eval_images_are_left_out_as_the_evaluator_leaves_them(tmp_path, capsys, caplog):
    """Skipped once, with a warning, and the recall is what `python -m ernievil2_train.evaluate` reports."""
    ckpt, model = tiny_checkpoint(tmp_path / "ckpt")
    write_evalset(tmp_path / "evalset", corrupt=(2, 3))
    argv = ["--checkpoint", str(ckpt), "--eval-set", str(tmp_path / "evalset"), "--max-len", str(MAX_LEN),
            "--device", "cpu", "--no-progress", "--json"]
    assert evaluate_main(argv) == 0
    expected = json.loads(capsys.readouterr().out)
    callback = RetrievalCallback(tmp_path / "evalset", vocab_file=ckpt / "vocab.txt", max_len=MAX_LEN,
                                 progress=False)
    with caplog.at_level(logging.WARNING, logger="ernievil2_train.callbacks.retrieval"):
        fit_one_epoch(model, callback)
    warnings = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(warnings) == 1
    assert "skipped 2 undecodable eval image(s)" in warnings[0] and "(first: 'img2')" in warnings[0]
    assert (len(callback.evalset.images), len(callback.evalset.texts)) == (5, expected["num_texts"])
    assert callback.last == pytest.approx({k: expected[k] for k in callback.last}, abs=1e-6)


def test_an_eval_set_without_a_decodable_image_is_a_config_error(tmp_path):
    ckpt, model = tiny_checkpoint(tmp_path / "ckpt")
    write_evalset(tmp_path / "evalset", num_images=2, corrupt=(0, 1))
    callback = RetrievalCallback(tmp_path / "evalset", vocab_file=ckpt / "vocab.txt", max_len=MAX_LEN,
                                 progress=False)
    with pytest.raises(ConfigError, match=r"evalset: no eval image could be decoded \(first: 'img0'\)"):
        fit_one_epoch(model, callback)


def test_cap_evalset(tmp_path):
    write_evalset(tmp_path / "evalset", num_images=7, num_texts=11)
    full = load_evalset(tmp_path / "evalset")
    capped = cap_evalset(full, 3)
    assert capped.image_ids == full.image_ids[:3] and len(capped.texts) <= 3
    for text, pos in zip(capped.texts, capped.text_to_images, strict=True):
        original = full.text_to_images[full.texts.index(text)]
        assert pos == [i for i in original if i < 3] and pos
    assert cap_evalset(full, None) is full


def test_ernie_protocol_pairs_each_text_with_its_first_image(tmp_path, setup):
    model, _, _ = setup
    callback = RetrievalCallback(
        tmp_path / "evalset",
        vocab_file=tmp_path / "ckpt" / "vocab.txt",
        protocol="ernie",
        max_len=MAX_LEN,
        progress=False,
        at_start=False,
    )
    fit_one_epoch(model, callback)
    evalset = load_evalset(tmp_path / "evalset")
    tokenizer = ErnieTokenizer(tmp_path / "ckpt" / "vocab.txt", max_len=MAX_LEN)
    transform = eval_transform(TINY["vision"]["image_size"])
    with torch.no_grad():
        text = model.encode_text(tokenizer(evalset.texts)["input_ids"])
        pixels = torch.stack([transform(evalset.images[p[0]]) for p in evalset.text_to_images])
        image = model.encode_image(pixels)
        expected = ernie_protocol(F.normalize(text, dim=-1), F.normalize(image, dim=-1), device="cpu")
    assert callback.last == pytest.approx(expected, rel=1e-6)


def test_ranks_by_cosine_similarity(setup):
    """Rescaling each embedding leaves the recall unchanged (the towers' raw outputs differ in norm once the
    final norms are trained; the losses and the official evaluation compare normalized embeddings)."""
    model, callback, expected = setup
    encode_image, encode_text = model.encode_image, model.encode_text

    def rescaled(encode, inputs: torch.Tensor) -> torch.Tensor:
        weights = inputs.float().flatten(1).mean(1, keepdim=True)
        return encode(inputs) * (1.0 + 50.0 * (weights - weights.min()).abs())

    model.encode_image = lambda pixels: rescaled(encode_image, pixels)
    model.encode_text = lambda ids: rescaled(encode_text, ids)
    trainer = fit_one_epoch(model, callback)
    for key in LOGGED:
        assert trainer.callback_metrics[f"retrieval/{key}"].item() == pytest.approx(expected[key], rel=1e-6)


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="protocol"):
        RetrievalCallback(tmp_path, vocab_file="v.txt", protocol="nope")
    with pytest.raises(ValueError, match="vocab_file"):
        RetrievalCallback(tmp_path)
    callback = RetrievalCallback(tmp_path / "missing", vocab_file="v.txt")
    with pytest.raises(ConfigError, match=r"callbacks\.retrieval\.eval_set"):
        callback.setup(None, None, "fit")


def test_wandb_table_offline(tmp_path, setup, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    model, callback, _ = setup
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="test")
    fit_one_epoch(model, callback, logger)
    run_dir = Path(logger.experiment.dir)
    logger.experiment.finish()
    tables = list(run_dir.glob("media/table/retrieval/examples*.table.json"))
    assert len(tables) == 2  # baseline + one epoch


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_half_precision_weights_are_evaluated_on_cpu(setup, precision):
    """With "-true" precisions the weights themselves are half precision: the eval runs under autocast (on
    CUDA the training precision's autocast is used for every precision)."""
    model, callback, expected = setup
    trainer = fit_one_epoch(model, callback, precision=precision)
    assert 0.0 < trainer.callback_metrics["retrieval/mean_recall"].item() <= 1.0
    assert callback.last["mean_recall"] == pytest.approx(expected["mean_recall"], abs=0.1)


def test_the_baseline_and_every_epoch_are_printed_with_a_progress_bar(setup, capsys):
    """The baseline runs before the progress bar draws its first bar; it must still reach the console."""
    model, callback, _ = setup
    fit_one_epoch(model, callback, progress_bar=True)
    out = capsys.readouterr().out
    assert "retrieval (zero-shot baseline): T2I R@1/5/10" in out and "retrieval (epoch 0): T2I" in out


def _fit_with_retrieval_bars(setup, capsys, progress_bar: bool) -> tuple[str, str]:
    """stdout and stderr of one epoch with the callback's bars on and the trainer's bar on or off."""
    model, callback, _ = setup
    callback.progress = True
    fit_one_epoch(model, callback, progress_bar=progress_bar)
    return capsys.readouterr()


def test_no_bars_when_the_trainer_shows_no_progress_bar(setup, capsys):
    out, err = _fit_with_retrieval_bars(setup, capsys, progress_bar=False)
    assert "%|" not in out + err
    assert "retrieval (zero-shot baseline): T2I" in out and "retrieval (epoch 0): T2I" in out


def test_bars_are_drawn_under_the_epoch_bar_and_erased(setup, capsys):
    """On the epoch bar's stream, on the line below it (where its validation bar goes), blanked when done."""
    out, err = _fit_with_retrieval_bars(setup, capsys, progress_bar=True)
    assert "%|" not in err
    epoch_end = out[out.index("Epoch 0: 100%") :]
    assert "\n\rRetrieval:" in epoch_end
    assert re.match(r"[^\n]*\n\r +\x1b\[A", epoch_end[epoch_end.rindex("Retrieval") :])


def test_texts_are_cut_to_the_models_positions_when_it_has_fewer_than_the_official_length(tmp_path):
    """A model of 16 text positions evaluated at the default 48 tokens failed with an IndexError on an eval
    text longer than 16 tokens."""
    ckpt, model = tiny_checkpoint(tmp_path / "ckpt")
    write_evalset(tmp_path / "evalset")
    with (tmp_path / "evalset" / "valid_texts.jsonl").open("a", encoding="utf-8") as fh:
        long_text = {"text_id": 99, "text": "一二三四五六七八九十" * 4, "image_ids": ["img0"]}
        fh.write(json.dumps(long_text, ensure_ascii=False) + "\n")
    callbacks = [RetrievalCallback(tmp_path / "evalset", vocab_file=ckpt / "vocab.txt", batch_size=4,
                                   progress=False, **length) for length in ({}, {"max_len": MAX_LEN})]
    assert callbacks[0].max_len > model.config.text.max_position_embeddings == MAX_LEN
    for callback in callbacks:
        fit_one_epoch(model, callback)
    assert callbacks[0].last == callbacks[1].last


def test_memory_the_retrieval_pass_cannot_get_names_its_batch_size(setup, monkeypatch):
    """An allocation that fails while the callback encodes the eval set names the callback's batch size,
    not the training batch size."""
    model, callback, _ = setup

    def too_large(pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return torch.empty(2**62, dtype=torch.uint8)  # the CPU allocator refuses it: a real RuntimeError

    monkeypatch.setattr(model, "encode_image", too_large)
    with pytest.raises(RuntimeError) as error:
        fit_one_epoch(model, callback)
    batches = OmegaConf.create({"data": {"datamodule": {"batch_size": 4096}},
                                "callbacks": {"retrieval": {"batch_size": 4}}})
    assert str(out_of_memory_error(error.value, batches)) == (
        "config key 'callbacks.retrieval.batch_size': out of CPU memory at 4 samples per batch (an "
        f"allocation of {2**42} MiB failed); lower it"
    )


def test_nan_weights_stop_the_run_with_one_line(tmp_path):
    """Weights gone NaN (a diverged training) give NaN embeddings: the run stops saying so, not with the
    metric's complaint about its inputs."""
    ckpt, model = tiny_checkpoint(tmp_path / "ckpt")
    write_evalset(tmp_path / "evalset")
    with torch.no_grad():
        model.text.ernie.embeddings.word_embeddings.weight.fill_(float("nan"))
    callback = RetrievalCallback(tmp_path / "evalset", vocab_file=ckpt / "vocab.txt", max_len=MAX_LEN,
                                 progress=False)
    with pytest.raises(TrainingDiverged, match=r"^the model gives NaN or infinite embeddings after 0 steps"):
        fit_one_epoch(model, callback)
