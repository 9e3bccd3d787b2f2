"""Building objects from config nodes, and choosing the checkpoint to resume from."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import wandb
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf

from ernievil2_train.callbacks.requeue import RequeueExit
from ernievil2_train.callbacks.retrieval import RetrievalCallback
from ernievil2_train.config_checks import ConfigError
from ernievil2_train.resolvers import register_resolvers
from ernievil2_train.train import (
    build,
    check_one_vocabulary,
    out_of_memory_error,
    settle_accumulation,
    settle_clipping,
    wandb_run_finished,
    without_retrieval_checkpoints,
)
from tests.data.shard_helpers import sample, write_shard, write_vocab

CONF = Path(__file__).resolve().parents[2] / "conf"


def test_build_reports_a_missing_input_by_config_key(tmp_path: Path) -> None:
    node = OmegaConf.create({"_target_": "ernievil2_train.data.datamodule.MultiViewDataModule",
                             "train_shards": str(tmp_path), "vocab_file": str(tmp_path / "vocab.txt")})
    with pytest.raises(ConfigError, match=re.escape("config key 'data.datamodule': vocab_file")):
        build("data.datamodule", node)


def test_build_reports_an_invalid_value_by_config_key() -> None:
    node = OmegaConf.create({"_target_": "ernievil2_train.callbacks.export.ExportBestModel",
                             "dirpath": "x", "mode": "sideways"})
    with pytest.raises(ConfigError, match=re.escape("config key 'callbacks.export': ExportBestModel.mode")):
        build("callbacks.export", node)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"batch_size": "abc"}, "config key 'data.datamodule.batch_size': expected int, got 'abc'"),
        ({"epoch_samples": 1.5}, "config key 'data.datamodule.epoch_samples': expected int or null, got 1.5"),
        ({"num_workers": True}, "config key 'data.datamodule.num_workers': expected int, got True"),
        ({"num_workers": -1}, "config key 'data.datamodule': num_workers must be 0"),
        ({"epoch_samples": 0}, "config key 'data.datamodule': epoch_samples must be positive, got 0"),
        ({"nope": 1}, "config key 'data.datamodule': MultiViewDataModule.__init__() got an unexpected"),
        ({"augment": {"filp_p": 0.5}}, "config key 'data.datamodule': augment: unknown field(s) filp_p"),
        ({"augment": {"flip_p": "often"}}, "config key 'data.datamodule': augment.flip_p: expected a number"),
        ({"augment": {"scale": [0.9, 0.1]}}, "config key 'data.datamodule': augment: scale must satisfy"),
        ({"augment": {"scale": [0.5]}}, "config key 'data.datamodule': augment.scale: expected 2 numbers"),
        ({"val_batch_size": 0}, "config key 'data.datamodule': val_batch_size must be positive, got 0"),
        ({"prefetch_factor": 0}, "config key 'data.datamodule': prefetch_factor must be positive, got 0"),
    ],
)
def test_build_names_the_key_of_a_bad_value(values: dict, message: str, tmp_path: Path) -> None:
    shards, vocab = tmp_path / "train-000000.tar", tmp_path / "vocab.txt"
    write_shard(shards, [sample(0)])
    write_vocab(vocab)
    node = OmegaConf.create({"_target_": "ernievil2_train.data.datamodule.MultiViewDataModule",
                             "train_shards": str(shards), "vocab_file": str(vocab), "epoch_samples": 4,
                             **values})
    with pytest.raises(ConfigError, match=re.escape(message)):
        build("data.datamodule", node)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"batch_size": 0}, "config key 'callbacks.retrieval': batch_size must be positive, got 0"),
        ({"max_items": 0}, "config key 'callbacks.retrieval': max_items must be positive (null: all), got 0"),
        ({"num_workers": -1}, "config key 'callbacks.retrieval': num_workers must be 0 or more, got -1"),
        ({"max_len": 1}, "config key 'callbacks.retrieval': max_len must be at least 2 ([CLS] and [SEP])"),
        ({"image_cache_mb": -1},
         "config key 'callbacks.retrieval': image_cache_mb must be 0 (no cache) or more, got -1"),
    ],
)
def test_build_names_the_retrieval_callbacks_bad_values(values: dict, message: str) -> None:
    node = OmegaConf.create({"_target_": "ernievil2_train.callbacks.retrieval.RetrievalCallback",
                             "eval_set": None, **values})
    with pytest.raises(ConfigError, match=re.escape(message)):
        build("callbacks.retrieval", node)


def test_build_checks_nested_targets_by_their_full_key() -> None:
    """`module.optimizer` is a partial inside the module's node; `lr: float | Tensor` takes a float here."""
    node = OmegaConf.create({"_target_": "ernievil2_train.module.ErnieVil2Module",
                             "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": "abc"}})
    with pytest.raises(ConfigError, match=re.escape("config key 'module.optimizer.lr': expected float")):
        build("module", node)


def test_build_names_the_key_of_an_unreadable_interpolated_file(tmp_path: Path) -> None:
    register_resolvers()
    (tmp_path / "vocab.txt").write_bytes(b"\xff\xfe not text")
    node = OmegaConf.create({"_target_": "builtins.int", "_args_": [f"${{vocab_size:{tmp_path}/vocab.txt}}"]})
    message = f"config key 'model': {tmp_path}/vocab.txt: not a UTF-8"
    with pytest.raises(ConfigError, match=re.escape(message)):
        build("model", node)


def test_build_lets_other_errors_through() -> None:
    """An error of the built object's own code is no config mistake: it stays Hydra's, with its cause."""
    node = OmegaConf.create({"_target_": "operator.truediv", "_args_": [1, 0]})
    with pytest.raises(InstantiationException, match="truediv") as info:
        build("callbacks.export", node)
    assert not isinstance(info.value, ConfigError) and isinstance(info.value.__cause__, ZeroDivisionError)


def test_training_evaluation_and_export_read_one_vocabulary(tmp_path: Path) -> None:
    """A vocabulary set for the training data alone (data.datamodule.vocab_file) leaves retrieval and the
    export on another: refused, naming both keys; the same ids in another file pass."""
    demo = write_vocab(tmp_path / "vocab.txt")
    permuted = write_vocab(tmp_path / "permuted.txt", chars="狗猫")
    copy = tmp_path / "copy.txt"
    copy.write_bytes(Path(demo).read_bytes())
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"data.vocab_file={demo}", f"data.datamodule.vocab_file={copy}"])
        check_one_vocabulary(cfg)
        cfg = compose("train", overrides=[f"data.vocab_file={demo}",
                                          f"data.datamodule.vocab_file={permuted}"])
    with pytest.raises(ConfigError, match=re.escape(
            f"config keys 'data.datamodule.vocab_file' ({permuted}) and 'callbacks.retrieval.vocab_file' "
            f"({demo}): other token ids; training, evaluation and export read one vocabulary")):
        check_one_vocabulary(cfg)


def test_model_pretrained_reads_the_checkpoints_vocabulary() -> None:
    """`model=pretrained` points the data at the checkpoint folder's vocab.txt."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["model=pretrained", "model.checkpoint=/models/ernie"])
    assert cfg.data.vocab_file == "/models/ernie/vocab.txt"
    assert cfg.data.datamodule.vocab_file == "/models/ernie/vocab.txt"


def _accumulating(k: int, batch_size: int = 64, trainer_clip: float | None = 1.0,
                  module_clip: float | None = None) -> OmegaConf:
    return OmegaConf.create({"module": {"accumulate_microbatches": k, "gradient_clip_val": module_clip},
                             "trainer": {"gradient_clip_val": trainer_clip},
                             "data": {"datamodule": {"batch_size": batch_size}}})


def test_the_module_takes_over_the_trainers_clipping() -> None:
    """The module clips in every case (Lightning cannot under manual optimization and refuses to for a fused
    optimizer under mixed precision or under FSDP): the trainer's value moves to the module, a value set on
    the module wins, and 0 or null clips nowhere."""
    cases = ((2, 1.0, None, (None, 1.0)), (2, 1.0, 0.5, (None, 0.5)), (1, 1.0, None, (None, 1.0)),
             (1, 0, None, (None, None)), (1, None, None, (None, None)))
    for k, trainer_clip, module_clip, expected in cases:
        cfg = _accumulating(k, trainer_clip=trainer_clip, module_clip=module_clip)
        settle_clipping(cfg)
        assert (cfg.trainer.gradient_clip_val, cfg.module.gradient_clip_val) == expected


def test_lightnings_gradient_accumulation_is_refused_at_start_up() -> None:
    cfg = _accumulating(2)
    cfg.trainer.accumulate_grad_batches = 1
    settle_accumulation(cfg)
    cfg.trainer.accumulate_grad_batches = 2
    with pytest.raises(ConfigError, match=r"^config key 'trainer.accumulate_grad_batches': 2 does not give "):
        settle_accumulation(cfg)


def test_clipping_by_value_is_refused_not_turned_into_norm_clipping() -> None:
    cfg = _accumulating(1)
    for algorithm in (None, "norm"):
        cfg.trainer.gradient_clip_algorithm = algorithm
        settle_clipping(cfg)
    cfg.trainer.gradient_clip_algorithm = "value"
    with pytest.raises(ConfigError, match=r"'trainer.gradient_clip_algorithm': 'value', but gradients are "):
        settle_clipping(cfg)


@pytest.mark.parametrize("precision", ["16-mixed", "16", "bf16-mixed", "32-true"])
def test_a_fused_optimizer_clips_except_under_fp16_mixed_precision(precision: str) -> None:
    """A fused optimizer unscales fp16 gradients inside its step, after the clipping: refused; bf16 has no
    grad scaler."""
    cfg = _accumulating(1)
    cfg.trainer.precision = precision
    cfg.module.optimizer = {"_target_": "torch.optim.AdamW", "fused": True}
    if precision.startswith("16"):
        with pytest.raises(ConfigError, match=r"'module.optimizer.fused': a fused optimizer unscales fp16"):
            settle_clipping(cfg)
    else:
        settle_clipping(cfg)
        assert cfg.module.gradient_clip_val == 1.0
    cfg.trainer.gradient_clip_val = None  # without clipping, nothing to refuse
    settle_clipping(cfg)


def test_micro_batches_must_split_the_batch_evenly() -> None:
    with pytest.raises(ConfigError, match=r"'module.accumulate_microbatches': 3 does not divide "
                                          r"data.datamodule.batch_size=64"):
        settle_accumulation(_accumulating(3))


@pytest.mark.parametrize("strategy", [{"_target_": "lightning.pytorch.strategies.FSDPStrategy"}, "fsdp"])
def test_micro_batches_are_refused_under_fsdp(strategy) -> None:
    """The feature cache back-propagates inside the training step, which FSDP runs in its own forward."""
    cfg = _accumulating(2)
    cfg.trainer.strategy = strategy
    refused = r"'module.accumulate_microbatches': 2 micro-batches do not run under FSDP .*grad_checkpointing"
    with pytest.raises(ConfigError, match=refused):
        settle_accumulation(cfg)
    cfg.trainer.strategy = "ddp"
    settle_accumulation(cfg)


def test_checkpoints_of_the_best_retrieval_epoch_need_an_eval_set(tmp_path: Path) -> None:
    best = ModelCheckpoint(dirpath=tmp_path, monitor="retrieval/mean_recall", mode="max")
    last = ModelCheckpoint(dirpath=tmp_path, filename="last")
    by_loss = ModelCheckpoint(dirpath=tmp_path, monitor="val/loss_image_caption")
    vocab = write_vocab(tmp_path / "vocab.txt")
    evaluating = RetrievalCallback(eval_set=str(tmp_path), split="valid", vocab_file=str(vocab),
                                   image_size=32)
    idle = RetrievalCallback(eval_set=None, split="valid", vocab_file=None, image_size=32)
    assert without_retrieval_checkpoints([evaluating, best, last]) == [evaluating, best, last]
    assert without_retrieval_checkpoints([idle, best, last, by_loss]) == [idle, last, by_loss]
    assert without_retrieval_checkpoints([best, last]) == [last]


def test_a_trainer_the_machine_cannot_run_is_a_config_error() -> None:
    node = OmegaConf.create({"_target_": "lightning.pytorch.Trainer", "accelerator": "cpu", "devices": 0})
    with pytest.raises(ConfigError, match=re.escape("config key 'trainer': `Trainer(devices=0)`")):
        build("trainer", node)
    missing = OmegaConf.create({"_target_": "lightning.pytorch.Trainer", "accelerator": "tpu"})
    with pytest.raises(ConfigError, match=r"^config key 'trainer': .*torch_xla"):  # not installed
        build("trainer", missing)


def test_a_gpu_trainer_without_a_gpu_says_how_to_run_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The experiments choose `trainer: gpu`; on a machine without one the error says what to add."""
    for accelerator in (CUDAAccelerator, MPSAccelerator):
        monkeypatch.setattr(accelerator, "is_available", staticmethod(lambda: False))
    node = OmegaConf.create({"_target_": "lightning.pytorch.Trainer", "accelerator": "gpu", "devices": 1})
    with pytest.raises(ConfigError, match=r"^config key 'trainer': No supported gpu backend found! \(no GPU "
                                          r"here: add trainer=cpu to the command\)$"):
        build("trainer", node)


@pytest.mark.parametrize(("ending", "exit_code"), [(None, 0), (RequeueExit, 0), (RuntimeError, 1),
                                                   (KeyboardInterrupt, 1), (SIGTERMException, 1)])
def test_the_wandb_run_is_finished_with_how_training_ended(ending, exit_code, tmp_path, monkeypatch):
    """A SLURM requeue (exit status 0) is no failure: the requeued job continues the same W&B run. A SIGTERM
    stop (Lightning's `SystemExit` without a code) is no finished run either."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(project="p", save_dir=str(tmp_path))
    _ = logger.experiment
    finished: list[int] = []
    monkeypatch.setattr(wandb, "finish", lambda exit_code=None: finished.append(exit_code))
    if ending is None:
        with wandb_run_finished([logger]):
            pass
    else:
        with pytest.raises(ending), wandb_run_finished([logger]):
            raise ending()
    assert finished == [exit_code]
    wandb.run.finish()


BATCHES = OmegaConf.create({"data": {"datamodule": {"batch_size": 4096}},
                            "callbacks": {"retrieval": {"batch_size": 64}}})


def test_an_allocation_that_fails_names_the_batch_size_that_asked_for_it() -> None:
    """The CPU allocator's error (a real one) and torch's GPU out-of-memory error become one line naming
    the training batch size and what lowers the memory it takes; other errors are left alone."""
    with pytest.raises(RuntimeError) as cpu:
        torch.empty(2**62, dtype=torch.uint8)
    assert str(out_of_memory_error(cpu.value, BATCHES)) == (
        "config key 'data.datamodule.batch_size': out of CPU memory at 4096 samples per batch (an allocation "
        f"of {2**42} MiB failed); lower it, or set module.accumulate_microbatches=K to run each batch as K "
        "micro-batches (the same loss), or module.grad_checkpointing=true"
    )
    gpu = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total "
                                 "capacity of 79.19 GiB of which 3.06 MiB is free.")
    assert str(out_of_memory_error(gpu, BATCHES)).startswith(
        "config key 'data.datamodule.batch_size': out of GPU memory at 4096 samples per batch (an allocation "
        "of 20.00 MiB failed); lower it"
    )
    assert out_of_memory_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), BATCHES) is None
    killed = RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")  # torch's words
    assert str(out_of_memory_error(killed, BATCHES)) == (
        "config key 'data.datamodule.num_workers': a data loader worker (pid 4242) is killed by signal: "
        "Killed (out of memory, likely); lower it or data.datamodule.batch_size")
    gone = RuntimeError("DataLoader worker (pid(s) 17, 18) exited unexpectedly")
    assert str(out_of_memory_error(gone, BATCHES)).startswith(
        "config key 'data.datamodule.num_workers': a data loader worker (pid 17, 18) exited unexpectedly")
