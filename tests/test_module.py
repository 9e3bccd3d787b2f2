"""The LightningModule under a real `lightning.Trainer` on CPU, and its start-up checks."""

from __future__ import annotations

import csv
import functools
import logging
import math
import re
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, IterableDataset, default_collate

from ernievil2_train.data.decode import SKIP_REASONS
from ernievil2_train.losses import MAX_LOG_SCALE, symmetric_infonce
from ernievil2_train.module import SCHEDULE_KEY, ErnieVil2Module, TrainingConfigError
from ernievil2_train.perf import HostSyncCounter
from tests.training_helpers import ALL_PAIRS, SyncWatch, make_batch, tiny_model

LOSS = {"weights": ALL_PAIRS, "multi_positive": True}


class EmptyStream(IterableDataset):
    """A stream with no sample, as a rank's validation shards whose samples are all skipped."""

    def __iter__(self):
        return iter(())


def _samples(n: int = 32, seed: int = 0, drop: tuple[str, ...] = ()) -> list[dict[str, torch.Tensor]]:
    batch = make_batch(n, seed=seed)
    return [{k: v[i] for k, v in batch.items() if k not in drop} for i in range(n)]


def _loader(batch_size: int = 8, **kwargs) -> DataLoader:
    return DataLoader(_samples(**kwargs), batch_size=batch_size, drop_last=True)


def _trainer(max_steps: int = 3, **kwargs) -> pl.Trainer:
    options = dict(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0)
    options.update(kwargs)
    return pl.Trainer(**options)


def _module(**kwargs) -> ErnieVil2Module:
    kwargs.setdefault("loss", LOSS)
    return ErnieVil2Module(tiny_model(seed=0), **kwargs)


def test_fit_logs_every_term_and_clamps_temperatures(tmp_path):
    module = _module(scheduler={"warmup_steps": 1})
    with torch.no_grad():
        module.model.logit_scale.fill_(7.0)  # above ln 100
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    logger = CSVLogger(tmp_path)
    trainer = _trainer(gradient_clip_val=1.0, logger=logger, log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=_loader())
    metrics = module.trainer.callback_metrics
    for pair in ALL_PAIRS:
        for name in (f"train/loss_{pair}", f"train/acc_{pair}", f"train/scale_{pair}"):
            assert name in metrics, name
            assert torch.isfinite(metrics[name]), name
    assert 0.0 < metrics["train/loss"].item() < 50
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as handle:
        logged = list(csv.DictReader(handle))
    rows = [r for r in logged if r.get("train/samples_per_s")]
    # every step after the first (start-up is not timed), at the steps its losses are logged at
    assert [r["step"] for r in rows] == ["1", "2"] == [r["step"] for r in logged if r.get("train/loss")][1:]
    for row in rows:
        assert float(row["train/samples_per_s"]) == float(row["train/samples_per_s_per_device"]) > 0
    assert module.model.logit_scale.item() <= MAX_LOG_SCALE + 1e-6
    assert all(0.0 <= p.item() <= MAX_LOG_SCALE for p in module.loss_fn.log_scales.values())
    assert 99.0 < metrics["train/scale_image_caption"].item() <= 100.0 + 1e-3  # clamped from e^7 at the start
    changed = [n for n, p in module.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("model.vision.") for n in changed)
    assert any(n.startswith("model.text.") for n in changed)


def test_temperatures_are_clamped_before_the_first_step() -> None:
    module = _module(loss={**LOSS, "temperature": "per_pair"})
    with torch.no_grad():
        module.model.logit_scale.fill_(7.0)  # above ln 100, as a loaded checkpoint may hold
        for scale in module.loss_fn.log_scales.values():
            scale.fill_(-1.0)
    module.on_train_start()
    assert module.model.logit_scale.item() == pytest.approx(MAX_LOG_SCALE)
    assert all(p.item() == 0.0 for p in module.loss_fn.log_scales.values())


@pytest.mark.parametrize("accumulate", [1, 2])
def test_training_steps_never_wait_for_the_device(accumulate):
    """Forward, four losses, backward, clipping, fused AdamW, schedule, clamping and logging between log
    steps, with and without feature-cache accumulation: no op that reads a device value on the host (the GPU
    recipe's settings, counted on CPU)."""
    watch = SyncWatch()
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-4, fused=True)
    loader = DataLoader(_samples(40), batch_size=8, drop_last=True,
                        collate_fn=lambda rows: {**torch.utils.data.default_collate(rows),
                                                 "skipped": torch.zeros(len(SKIP_REASONS), dtype=torch.long)})
    trainer = _trainer(max_steps=5, callbacks=[watch], gradient_clip_val=None, log_every_n_steps=50)
    module = _module(optimizer=optimizer, accumulate_microbatches=accumulate, gradient_clip_val=1.0)
    trainer.fit(module, train_dataloaders=loader)
    assert watch.batches == 4
    assert dict(watch.counter.ops) == {}


class LossLog(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.slow
def test_compiled_towers_train_like_eager_without_graph_breaks():
    """`compile=True` under a real Trainer: one graph per tower, no graph break, the eager losses."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    runs = []
    for compile in (False, "default"):
        log = LossLog()
        _trainer(max_steps=3, callbacks=[log]).fit(_module(compile=compile), train_dataloaders=_loader())
        runs.append(log.losses)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(runs[1]) == 3
    torch.testing.assert_close(torch.tensor(runs[1]), torch.tensor(runs[0]), atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()


def test_host_sync_counter_sees_reads_and_data_dependent_shapes():
    x = torch.arange(6.0, requires_grad=True)
    with HostSyncCounter() as counter:
        y = x[x > 2].sum()
        y.backward()
        bool(y > 0)
        torch.nn.functional.normalize(x, dim=0) * torch.tensor(2.0)
        torch.full((), 2.0)
    # x[mask] forward (index) and backward (index_put), bool(y > 0), torch.tensor (a copy from host memory)
    expected = {"aten.index": 1, "aten.index_put": 1, "aten._local_scalar_dense": 1, "aten.lift_fresh": 1}
    assert counter.ops == expected


def test_feature_cache_under_trainer_matches_one_pass():
    """k=2 micro-batches (manual optimization) sees the same first-step gradient as k=1."""

    class GradProbe(pl.Callback):
        def __init__(self) -> None:
            self.grads: dict[str, torch.Tensor] | None = None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            if self.grads is None:
                named = pl_module.named_parameters()
                self.grads = {n: p.grad.clone() for n, p in named if p.grad is not None}

    probes = []
    for k, clip in ((1, None), (2, 5.0)):
        probe = GradProbe()
        module = _module(accumulate_microbatches=k, gradient_clip_val=clip)
        trainer = _trainer(max_steps=2, callbacks=[probe], gradient_clip_val=None)
        trainer.fit(module, train_dataloaders=_loader())
        assert module.trainer.global_step == 2
        assert module.lr_schedulers().last_epoch == 2
        probes.append(probe.grads)
    assert set(probes[0]) == set(probes[1])
    diff = max((probes[0][n] - probes[1][n]).abs().max().item() for n in probes[0])
    assert diff < 1e-5, diff


def test_feature_cache_accumulation_logs_the_scales_its_losses_used():
    """The temperature logged at a step is the one its loss used, before the optimizer step moves it."""
    logged = []
    for k in (1, 2):
        module = _module(accumulate_microbatches=k, temperature_lr=0.5)
        _trainer(max_steps=2).fit(module, train_dataloaders=_loader())
        logged.append({name: float(value) for name, value in module.trainer.callback_metrics.items()
                       if name.startswith("train/scale_")})
        assert len(logged[-1]) == 4
    assert logged[0] == pytest.approx(logged[1], rel=1e-6)


def test_log_every_n_steps_zero_logs_no_step(tmp_path):
    """Lightning takes 0 as "no step logging"; the throughput report follows it."""
    logged: list[tuple[int | None, set[str]]] = []

    class RecordingLogger(CSVLogger):
        def log_metrics(self, metrics, step=None):
            logged.append((step, set(metrics)))
            super().log_metrics(metrics, step)

    module = _module()
    trainer = _trainer(max_steps=3, log_every_n_steps=0, logger=RecordingLogger(tmp_path))
    trainer.fit(module, train_dataloaders=_loader())
    assert module.trainer.global_step == 3
    per_step = [(step, names) for step, names in logged if any(n.startswith("train/") for n in names)]
    assert per_step == []


def test_skip_counts_are_summed_per_epoch():
    samples = _samples(16)
    loader = DataLoader(samples, batch_size=8, drop_last=True,
                        collate_fn=lambda rows: {**torch.utils.data.default_collate(rows),
                                                 "skipped": torch.arange(len(SKIP_REASONS))})
    module = _module()
    _trainer(max_steps=-1, max_epochs=1).fit(module, train_dataloaders=loader)
    for i, reason in enumerate(SKIP_REASONS):
        assert module.trainer.callback_metrics[f"data/skipped_{reason}"].item() == 2 * i


def test_a_run_resumed_mid_epoch_logs_the_whole_epochs_skip_counts(tmp_path):
    """Skips counted before a mid-epoch checkpoint are kept in it; those of an epoch-end one are not carried
    into the next epoch."""
    samples = _samples(32)
    loader = DataLoader(samples, batch_size=8, drop_last=True,
                        collate_fn=lambda rows: {**torch.utils.data.default_collate(rows),
                                                 "skipped": torch.arange(len(SKIP_REASONS))})
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="{step}", save_top_k=-1,
                                         every_n_train_steps=1)
    _trainer(max_steps=-1, max_epochs=2, callbacks=[saver], enable_checkpointing=True).fit(
        _module(), train_dataloaders=loader)
    for ckpt, epochs, per_reason in (("step=3", 1, 4), ("step=4", 2, 4), ("step=5", 2, 4)):
        module = _module()
        _trainer(max_steps=-1, max_epochs=epochs).fit(module, train_dataloaders=loader,
                                                      ckpt_path=tmp_path / f"{ckpt}.ckpt")
        logged = [module.trainer.callback_metrics[f"data/skipped_{r}"].item() for r in SKIP_REASONS]
        assert logged == [per_reason * i for i in range(len(SKIP_REASONS))], ckpt


class _LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


def test_a_resumed_run_draws_the_dropout_masks_of_the_uninterrupted_run(tmp_path, monkeypatch):
    """With dropout on, the losses after the checkpoint are the uninterrupted run's, to the bit: the
    checkpoint keeps the random generators' states (the resumed model is built anew, from its seed). A
    fresh run parts the ranks' generators; a resumed one takes them from the checkpoint instead."""
    parted: list[int] = []
    monkeypatch.setattr("ernievil2_train.module.part_ranks", parted.append)  # rank 0: no change anyway
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="{step}", save_top_k=-1,
                                         every_n_train_steps=1)
    def loader() -> DataLoader:  # as the datamodule's: starting a pass draws from the loader's own generator
        return DataLoader(_samples(), batch_size=8, drop_last=True, generator=torch.Generator())

    full = _LossRecorder()
    _trainer(max_steps=-1, max_epochs=2, callbacks=[saver, full], enable_checkpointing=True).fit(
        ErnieVil2Module(tiny_model(dropout=0.3), loss=LOSS), train_dataloaders=loader())
    assert len(full.losses) == 8 and parted == [0]
    resumed = _LossRecorder()  # from the end of the first epoch (this loader cannot resume mid-epoch)
    _trainer(max_steps=-1, max_epochs=2, callbacks=[resumed]).fit(
        ErnieVil2Module(tiny_model(dropout=0.3), loss=LOSS), train_dataloaders=loader(),
        ckpt_path=tmp_path / "step=4.ckpt")
    assert sorted(resumed.losses) == [5, 6, 7, 8]
    assert resumed.losses == {step: full.losses[step] for step in resumed.losses}
    assert parted == [0]


def test_validation_logs_image_caption_loss_and_accuracy():
    module = _module()
    _trainer(max_steps=1, limit_val_batches=2, val_check_interval=1).fit(module, train_dataloaders=_loader(),
                                                   val_dataloaders=_loader(seed=5))
    metrics = module.trainer.callback_metrics
    assert torch.isfinite(metrics["val/loss_image_caption"])
    assert 0.0 <= metrics["val/acc_image_caption"].item() <= 1.0


def _val_loader(skipped: torch.Tensor | None = None) -> DataLoader:
    """10 samples in batches of 4, 4 and 2, each carrying `skipped` if given."""
    def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = default_collate(rows)
        return batch if skipped is None else {**batch, "skipped": skipped}

    return DataLoader(_samples(10, seed=5), batch_size=4, collate_fn=collate)


def test_validation_logs_sample_weighted_epoch_means_and_skip_totals():
    """The epoch's loss and accuracy are the batch-size-weighted means of the per-batch values (as
    `self.log(..., batch_size=n)` averages them); the skip counts the batches carry are summed."""
    module = _module()
    (logged,) = _trainer().validate(module, dataloaders=_val_loader(torch.arange(len(SKIP_REASONS))),
                                    verbose=False)
    per_batch, sizes = [], []
    with torch.no_grad():
        for batch in _val_loader():
            feats = {k: torch.nn.functional.normalize(v, dim=-1)
                     for k, v in module._encode(batch, ["image", "caption"]).items()}
            img, txt, scale = feats["image"], feats["caption"], module.model.logit_scale.exp()
            keys = [batch["image_key"], batch["caption_key"]]
            loss, acc = symmetric_infonce(img, txt, txt, img, scale, 0, keys=keys)
            per_batch.append(torch.stack([loss, acc]))
            sizes.append(len(batch["image"]))
    assert sizes == [4, 4, 2]
    expected = (torch.stack(per_batch) * torch.tensor(sizes)[:, None]).sum(0) / sum(sizes)
    assert logged["val/loss_image_caption"] == pytest.approx(expected[0].item(), rel=1e-6)
    assert logged["val/acc_image_caption"] == pytest.approx(expected[1].item(), rel=1e-6)
    for i, reason in enumerate(SKIP_REASONS):
        assert logged[f"val/skipped_{reason}"] == 3 * i


def test_validation_without_batches_or_skip_counts_logs_neither():
    """No batch: no loss or accuracy (nothing to average); batches without `skipped`: no skip totals."""
    module = _module()
    trainer = _trainer()
    trainer.validate(module, dataloaders=DataLoader(EmptyStream(), batch_size=None), verbose=False)
    assert not [name for name in trainer.callback_metrics if name.startswith("val/")]
    trainer.validate(module, dataloaders=_val_loader(), verbose=False)
    assert sorted(name for name in trainer.callback_metrics if name.startswith("val/")) == [
        "val/acc_image_caption", "val/loss_image_caption"]


@pytest.mark.parametrize("weights", [ALL_PAIRS, {"image_caption": 1.0, "text_text": 0.5}])
def test_logged_metrics_are_the_names_a_run_logs(weights):
    """What callbacks may monitor (checked at start-up) is what one epoch with validation logs."""
    module = _module(loss={"weights": weights})
    trainer = _trainer(max_steps=-1, max_epochs=1)
    val = _val_loader(torch.arange(len(SKIP_REASONS)))
    trainer.fit(module, train_dataloaders=_loader(), val_dataloaders=val)
    logged = set(trainer.callback_metrics)
    assert logged == module.logged_metrics(validates=True)
    assert module.logged_metrics(validates=False) == {n for n in logged if not n.startswith("val/")}


def test_missing_batch_key_names_key_and_loss():
    module = _module()
    expected = r"module.loss.weights.image_tags > 0 needs batch key 'tag_ids'"
    with pytest.raises(TrainingConfigError, match=expected):
        _trainer().fit(module, train_dataloaders=_loader(drop=("tag_ids",)))
    single = _module(loss={"weights": {"image_caption": 1.0}, "multi_positive": True})
    with pytest.raises(TrainingConfigError, match=r"'image_key'.*multi_positive"):
        _trainer().fit(single, train_dataloaders=_loader(drop=("image_key",)))
    second = _module(loss={"weights": {"image_caption": 1.0}, "caption_image_view": 2})
    expected = (r"weights.image_caption > 0 needs batch key 'image_view2' .*: turn on that view in the data "
                r"config or set module.loss.weights.image_caption=0, or module.loss.caption_image_view=1$")
    with pytest.raises(TrainingConfigError, match=expected):
        second.check_batch_keys({"image", "caption_ids"})


def test_lightning_gradient_accumulation_is_refused():
    with pytest.raises(TrainingConfigError, match="accumulate_microbatches"):
        _trainer(accumulate_grad_batches=2).fit(_module(), train_dataloaders=_loader())


@pytest.mark.parametrize("kwargs,match", [
    ({"freeze_vision": True, "freeze_text": True}, "both set"),
    ({"freeze_text": True}, "module.freeze_text with module.loss.weights.text_text"),
    ({"freeze_vision": True}, "module.freeze_vision with module.loss.weights.image_image"),
    ({"gradient_clip_val": float("nan")}, "gradient_clip_val must be positive"),
    ({"gradient_clip_val": -1.0, "accumulate_microbatches": 2}, "gradient_clip_val must be positive"),
    ({"accumulate_microbatches": 0}, "accumulate_microbatches must be >= 1"),
    ({"layer_decay": 1.5}, "layer_decay"),
    ({"vision_lr": -1.0}, "module.vision_lr must be 0 or more"),
    ({"temperature_lr": float("inf")}, "module.temperature_lr must be 0 or more"),
    ({"compile": "fastest"}, "module.compile must be true, false or one of default, reduce-overhead"),
])
def test_flag_combinations_are_refused(kwargs, match):
    with pytest.raises(TrainingConfigError, match=match):
        _module(**kwargs)


@pytest.mark.parametrize(("optimizer", "match"), [
    ({"betas": (0.9,)}, "^module.optimizer: "),
    ({"betas": "abc"}, "^module.optimizer: "),
    ({"foo": 1}, "^module.optimizer: .*unexpected keyword argument 'foo'"),
    ({"lr": -1}, "^module.optimizer: Invalid learning rate: -1$"),
])
def test_optimizer_settings_the_optimizer_refuses_name_the_optimizer(optimizer, match):
    """An IndexError (one beta) or a TypeError (a setting of another optimizer) was a traceback; refused
    when the module is built, before a run starts its loggers and the zero-shot baseline."""
    with pytest.raises(TrainingConfigError, match=match):
        _module(optimizer=functools.partial(torch.optim.AdamW, **{"lr": 1e-3, **optimizer}))


@pytest.mark.parametrize(("lrs", "refused"), [
    ({}, True),
    ({"vision_lr": 0.0, "text_lr": 0.0, "temperature_lr": 0.0}, True),
    ({"text_lr": 1e-4}, False),
    ({"temperature_lr": 1e-3}, False),
])
def test_an_lr_of_zero_for_every_part_is_refused(lrs: dict, refused: bool) -> None:
    """Nothing would train; an lr of 0 with one part's own lr above it trains that part."""
    build = functools.partial(_module, optimizer=functools.partial(torch.optim.AdamW, lr=0.0), **lrs)
    if not refused:
        build()
        return
    with pytest.raises(TrainingConfigError, match=re.escape(
            "module.optimizer.lr is 0 and no vision_lr, text_lr or temperature_lr is above it: nothing would "
            "train")):
        build()


def test_a_run_without_training_steps_names_the_trainer_settings():
    with pytest.raises(TrainingConfigError, match=re.escape(
        "the run has no training step to schedule (trainer.max_steps=-1, max_epochs=1, limit_train_batches=0)"
    )):
        trainer = _trainer(max_steps=-1, max_epochs=1, limit_train_batches=0)
        trainer.fit(_module(), train_dataloaders=_loader())


def test_frozen_tower_is_eval_gradless_and_not_optimized():
    module = _module(loss={"weights": {"image_caption": 1.0}}, freeze_text=True)
    module.train()
    assert module.model.vision.training and not module.model.text.training
    assert not any(p.requires_grad for p in module.model.text.parameters())
    optimized = {id(p) for g in module.param_groups() for p in g["params"]}
    assert not any(id(p) in optimized for p in module.model.text.parameters())
    assert all(id(p) in optimized for p in module.model.vision.parameters())
    _trainer(max_steps=1).fit(module, train_dataloaders=_loader())
    assert all(p.grad is None for p in module.model.text.parameters())


def test_towers_and_temperatures_no_loss_uses_are_frozen():
    module = _module(loss={"weights": {"image_image": 1.0}})
    assert "text" in module.frozen and not module.model.logit_scale.requires_grad
    assert module.loss_fn.log_scales["image_image"].requires_grad
    fixed = _module(loss={"weights": {"image_caption": 1.0}, "temperature": "fixed"})
    assert not fixed.model.logit_scale.requires_grad
    assert not any(g["name"].startswith("temperature") for g in fixed.param_groups())


def test_only_needed_views_are_encoded():
    calls = []
    module = _module(loss={"weights": {"image_caption": 1.0, "text_text": 1.0}})
    encode_image, encode_text = module.model.encode_image, module.model.encode_text
    module.model.encode_image = lambda x: calls.append(("image", x.shape[0])) or encode_image(x)
    module.model.encode_text = lambda x: calls.append(("text", x.shape[0])) or encode_text(x)
    out = module(make_batch(4))
    assert calls == [("image", 4), ("text", 8)]  # one call per tower; no view 2, no tags
    assert set(out) == {"loss", "loss_image_caption", "acc_image_caption", "loss_text_text", "acc_text_text"}
    both = _module(loss={"weights": ALL_PAIRS})
    calls.clear()
    encode_image, encode_text = both.model.encode_image, both.model.encode_text
    both.model.encode_image = lambda x: calls.append(("image", x.shape[0])) or encode_image(x)
    both.model.encode_text = lambda x: calls.append(("text", x.shape[0])) or encode_text(x)
    both(make_batch(4))
    assert calls == [("image", 8), ("text", 12)]


def test_schedule_reaches_min_ratio():
    module = _module(optimizer=functools.partial(torch.optim.SGD, lr=0.5),
                     scheduler={"warmup_steps": 2, "min_lr_ratio": 0.1})
    _trainer(max_steps=4).fit(module, train_dataloaders=_loader())
    lrs = [g["lr"] for g in module.optimizers().param_groups]
    assert all(math.isclose(lr, 0.05) for lr in lrs), lrs


@pytest.mark.parametrize(("accumulate", "precision", "fused"), [
    (2, None, False), (2, "16-mixed", False), (1, None, False), (1, "16-mixed", False),
    (1, "bf16-mixed", True),  # Lightning itself refuses to clip for a fused optimizer under mixed precision
])
def test_the_module_clips_the_unscaled_gradient(accumulate, precision, fused):
    """`gradient_clip_val` bounds the true gradient norm, with and without feature-cache accumulation, also
    under fp16 AMP (whose grad scaler multiplies the gradients by 2**16 until it unscales them before the
    step) and for a fused optimizer under bf16 AMP."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    clip = 0.01
    sgd = functools.partial(torch.optim.SGD, lr=1.0, fused=fused)
    module = _module(loss={"weights": {"image_caption": 1.0}}, accumulate_microbatches=accumulate,
                     gradient_clip_val=clip, optimizer=sgd)
    trainable = [p for p in module.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    plugins = [MixedPrecision(precision, "cpu")] if precision else []
    _trainer(max_steps=1, plugins=plugins).fit(module, train_dataloaders=_loader())
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(trainable, before, strict=True)]).norm()
    assert step.item() == pytest.approx(clip, rel=1e-3)  # SGD, lr 1: the step is the clipped gradient


def test_validation_treats_captions_of_one_image_as_positives():
    """With `loss.multi_positive`, validation scores the captions of the same image as training does."""
    batch = make_batch(8, seed=6)  # image 0 has three captions in the batch
    text_proj = torch.randn(batch["caption_ids"].shape[1], 32, generator=torch.Generator().manual_seed(0))
    logged: dict[str, float] = {}
    results = {}
    for multi in (True, False):
        module = _module(loss={"weights": {"image_caption": 1.0}, "multi_positive": multi}).eval()
        # spread-out stand-in features (the untrained towers map every input to nearly the same direction)
        module.model.encode_image = lambda pixels: pixels.flatten(1)[:, :32]
        module.model.encode_text = lambda ids: ids.float() @ text_proj
        module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
        with torch.no_grad():
            module.on_validation_epoch_start()
            module.validation_step(batch, 0)
            module.on_validation_epoch_end()
            feats = {k: torch.nn.functional.normalize(v, dim=-1)
                     for k, v in module._encode(batch).items()}
        results[multi] = dict(logged)
        keys = [batch["image_key"], batch["caption_key"]] if multi else None
        expected = symmetric_infonce(feats["image"], feats["caption"], feats["caption"], feats["image"],
                                     module.model.logit_scale.exp(), 0, keys=keys)
        assert logged["val/loss_image_caption"] == pytest.approx(expected[0].item(), rel=1e-5)
        assert logged["val/acc_image_caption"] == pytest.approx(expected[1].item())
    soft, hard = (results[m]["val/loss_image_caption"] for m in (True, False))
    assert abs(soft - hard) > 1e-3 * hard


def test_validation_logs_the_skip_counts_of_a_single_report() -> None:
    """Skip totals are logged when exactly one validation batch carries counts: here a batch of only
    `skipped` (a loader worker's last report) after two sample batches without them."""
    counts = torch.arange(len(SKIP_REASONS)) + 1
    samples = _samples(8, seed=5)
    batches = [default_collate(samples[:4]), default_collate(samples[4:]), {"skipped": counts}]
    module = _module()
    (logged,) = _trainer().validate(module, dataloaders=DataLoader(batches, batch_size=None), verbose=False)
    assert {name: logged[f"val/skipped_{name}"] for name in SKIP_REASONS} == dict(
        zip(SKIP_REASONS, counts.tolist(), strict=True))
    assert math.isfinite(logged["val/loss_image_caption"])


def test_the_models_temperature_is_clamped_from_below_at_zero() -> None:
    """A negative log logit scale of the model (a scale below 1) is raised to 0."""
    module = _module()
    assert module.model.logit_scale.requires_grad
    with torch.no_grad():
        module.model.logit_scale.fill_(-2.0)
    module.clamp_temperatures()
    assert module.model.logit_scale.item() == 0.0


@pytest.mark.parametrize(("saved", "warns"), [(12, True), (10, False), (None, False)])
def test_a_resume_with_another_schedule_length_warns(saved: int | None, warns: bool,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Resuming from a checkpoint whose lr schedule was laid out for another number of optimizer steps warns
    (the learning rate jumps) in a log line, not a Python warning with its source line; the same number, or a
    checkpoint without it, does not."""
    module = _module(scheduler={"total_steps": 10})
    module.on_load_checkpoint({SCHEDULE_KEY: saved} if saved is not None else {})
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="ernievil2_train.module"):
        warnings.simplefilter("error")
        module.configure_optimizers()
    expected = ("resuming a run whose lr schedule was laid out for 12 optimizer steps with one of 10 "
                "(trainer.max_epochs or max_steps")
    schedule_warnings = [r.getMessage() for r in caplog.records if "lr schedule" in r.getMessage()]
    assert [m.startswith(expected) for m in schedule_warnings] == ([True] if warns else [])
    assert module._schedule_steps == 10
