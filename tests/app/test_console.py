"""What a training run prints: each message once, no bars when progress bars are off, no third-party noise."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ernievil2_train.cpu_threads import available_cores
from tests.app.test_cli import _cli, _env, _run
from tests.conftest import REPO_ROOT

# A Hydra app on the project's config that imports Lightning before or after Hydra sets up logging.
APP = """
import sys

if sys.argv.pop(1) == "early":
    import lightning.pytorch
import hydra


@hydra.main(version_base="1.3", config_path={conf!r}, config_name="train")
def main(cfg):
    import lightning.pytorch as pl

    pl.seed_everything(0)


main()
"""


@pytest.fixture(scope="module")
def quiet_run(demo_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:
    """stdout, stderr and run folder of a one-epoch CLI run with no progress bar but retrieval bars on, and
    no compute thread count set in the environment."""
    run_dir = tmp_path_factory.mktemp("console") / "run"
    overrides = ("trainer.max_epochs=1", "logger=csv", "callbacks.retrieval.progress=true")
    env = _env(demo_cache)
    del env["OMP_NUM_THREADS"]
    result = _run(_cli(run_dir, *overrides), env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, result.stderr, run_dir


def test_each_message_is_printed_once_and_logged_to_the_run_file(quiet_run):
    out, err, run_dir = quiet_run
    assert (out + err).count("Seed set to") == 1, out + err
    assert (out + err).count("exported best model") == 1, out + err
    log = (run_dir / "ernievil2_train.log").read_text()
    assert "Seed set to" in log and "exported best model" in log
    assert "retrieval (zero-shot baseline): T2I" in log and "retrieval (epoch 0): T2I" in log
    assert out.count("retrieval (epoch 0): T2I") == 1
    threads = max(1, available_cores() - 1)  # one loader worker
    assert f"training on CPU with {threads} compute thread(s) per process ({available_cores()} cores" in log


def test_no_retrieval_bars_without_the_trainer_progress_bar(quiet_run):
    out, err, _ = quiet_run
    assert "Retrieval" not in out + err and "%|" not in out + err
    assert "retrieval (zero-shot baseline): T2I" in out and "retrieval (epoch 0): T2I" in out


def test_known_third_party_warnings_are_not_printed(quiet_run):
    out, err, _ = quiet_run
    for noise in ("LeafSpec", "`IterableDataset` has `__len__`", "litlogger"):
        assert noise not in out + err, f"{noise!r} printed: is quiet_known_warnings() called by train()?"


@pytest.mark.parametrize("lightning_import", ["early", "late"])
def test_lightning_messages_print_once_whenever_lightning_is_imported(lightning_import, demo_cache, tmp_path):
    app = tmp_path / "app.py"
    app.write_text(APP.format(conf=str(REPO_ROOT / "conf")))
    result = _run([sys.executable, str(app), lightning_import, f"hydra.run.dir={tmp_path / 'run'}"],
                  _env(demo_cache))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (result.stdout + result.stderr).count("Seed set to 0") == 1, result.stdout + result.stderr
    assert "Seed set to 0" in (tmp_path / "run" / "ernievil2_train.log").read_text()


def test_help_starts_with_the_app_name(demo_cache):
    result = _run([sys.executable, "-m", "ernievil2_train", "--help"], _env(demo_cache))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0].startswith("ernievil2_train: "), result.stdout[:300]
