"""The start-up check of monitored metric names, and the late refusal of names nobody logged."""

from __future__ import annotations

from datetime import timedelta

import pytest
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from ernievil2_train.callbacks.export import ExportBestModel
from ernievil2_train.callbacks.monitors import check_monitors, check_retrieval_timing, missing_monitor_error
from ernievil2_train.config_checks import ConfigError

LOGGED = {"train/loss", "train/loss_image_caption", "retrieval/mean_recall", "retrieval/t2i/r@1",
          "data/skipped_bad_image", "data/skipped_bad_tar", "epoch", "step"}


def _checkpoint(monitor: str | None, tmp_path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=tmp_path, monitor=monitor, mode="max")


@pytest.mark.parametrize("monitor", ["retrieval/mean_recall", "train/loss", "epoch", "my_own_metric", None])
def test_known_custom_and_absent_monitors_pass(monitor, tmp_path):
    check_monitors({"best": _checkpoint(monitor, tmp_path), "plain": object()}, LOGGED)


@pytest.mark.parametrize(
    ("monitor", "message"),
    [
        ("retrieval/mean_recal",
         "this run never logs 'retrieval/mean_recal'; did you mean 'retrieval/mean_recall'?"),
        ("mean_recall", "this run never logs 'mean_recall'; did you mean 'retrieval/mean_recall'?"),
        ("loss_image_captoin", "did you mean 'train/loss_image_caption'?"),
        ("train/accuracy",
         "this run never logs 'train/accuracy'; it logs train/loss, train/loss_image_caption"),
        ("val/loss",
         "this run never logs 'val/loss'; it has no validation data (data.datamodule.val_shards)"),
        ("data/skips", "this run never logs 'data/skips'; it logs the skip counts (data/skipped_<reason>)"),
        ("retrieval/map",
         "this run never logs 'retrieval/map'; it logs retrieval/mean_recall, retrieval/t2i/r@1"),
    ],
)
def test_unknown_project_names_and_typos_are_refused_naming_the_callback(monitor, message, tmp_path):
    callbacks = {"model_checkpoint": _checkpoint("train/loss", tmp_path),
                 "early_stop": EarlyStopping(monitor=monitor, mode="max")}
    with pytest.raises(ConfigError) as caught:
        check_monitors(callbacks, LOGGED)
    assert str(caught.value).startswith("config key 'callbacks.early_stop.monitor': ")
    assert str(caught.value).endswith(message)


def test_skip_counts_are_listed_when_the_monitor_is_one(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'data/skipped_bad_tar'"):
        check_monitors({"export": ExportBestModel(tmp_path, monitor="data/skiped_bad_tar")}, LOGGED)
    with pytest.raises(ConfigError, match=r"it logs data/skipped_bad_image, data/skipped_bad_tar$"):
        check_monitors({"export": ExportBestModel(tmp_path, monitor="data/skipped_unknown")}, LOGGED)


def test_lightnings_late_refusals_name_the_callback(tmp_path):
    callbacks = {"best": _checkpoint("my_metric", tmp_path), "stop": EarlyStopping(monitor="other_metric")}
    late = Exception("`ModelCheckpoint(monitor='my_metric')` could not find the monitored key in the "
                     "returned metrics: ['train/loss']")
    error = missing_monitor_error(late, callbacks, ["train/loss", "data/skipped_bad_tar"])
    assert str(error) == ("config key 'callbacks.best.monitor': no metric 'my_metric' was logged by the "
                          "epoch's end; the run logged train/loss, the skip counts (data/skipped_<reason>)")
    stop = RuntimeError("Early stopping conditioned on metric `other_metric` which is not available.")
    assert str(missing_monitor_error(stop, callbacks, ["train/loss"])).startswith(
        "config key 'callbacks.stop.monitor': no metric 'other_metric' was logged")
    assert missing_monitor_error(RuntimeError("CUDA error"), callbacks, ["train/loss"]) is None


@pytest.mark.parametrize(
    ("callback", "setting", "fix"),
    [
        (dict(every_n_train_steps=2), "every_n_train_steps", "remove it"),
        (dict(train_time_interval=timedelta(minutes=30)), "train_time_interval", "remove it"),
        (dict(save_on_train_epoch_end=False), "save_on_train_epoch_end", "set it to true"),
    ],
)
def test_a_best_checkpoint_by_recall_acts_at_the_epoch_end_only(callback, setting, fix, tmp_path):
    checkpoints = {"best": ModelCheckpoint(dirpath=tmp_path, monitor="retrieval/mean_recall", **callback)}
    with pytest.raises(ConfigError) as caught:
        check_retrieval_timing(checkpoints, validates_once_per_epoch=True)
    assert str(caught.value) == (f"config key 'callbacks.best.{setting}': retrieval/mean_recall is logged at "
                                 f"the end of each training epoch only; {fix}")
    by_loss = {"best": ModelCheckpoint(dirpath=tmp_path, monitor="train/loss", **callback)}
    check_retrieval_timing(by_loss, validates_once_per_epoch=True)


def test_an_early_stop_by_recall_must_act_at_the_epoch_end_when_validation_does_not(tmp_path):
    def stop(at_end: bool | None) -> dict[str, EarlyStopping]:
        return {"stop": EarlyStopping(monitor="retrieval/mean_recall", check_on_train_epoch_end=at_end)}

    for at_end in (None, True):
        check_retrieval_timing(stop(at_end), validates_once_per_epoch=True)
    check_retrieval_timing(stop(True), validates_once_per_epoch=False)
    refused = r"^config key 'callbacks.stop.check_on_train_epoch_end': .* set it to true$"
    for at_end, once in ((None, False), (False, True), (False, False)):
        with pytest.raises(ConfigError, match=refused):
            check_retrieval_timing(stop(at_end), validates_once_per_epoch=once)
    default = {"best": ModelCheckpoint(dirpath=tmp_path, monitor="retrieval/mean_recall")}
    with pytest.raises(ConfigError, match=r"'callbacks.best.save_on_train_epoch_end'"):
        check_retrieval_timing(default, validates_once_per_epoch=False)
