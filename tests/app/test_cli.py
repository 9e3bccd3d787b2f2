"""End-to-end runs of the real training CLI in subprocesses, on the demo data."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ernievil2_train import load_pretrained
from ernievil2_train.data.decode import SKIP_REASONS
from tests.app_helpers import TINY_MODEL, tiny_checkpoint
from tests.conftest import with_ctrl_c
from tests.data_recipes.helpers import image_bytes

TINY = [
    "data.image_size=32",
    "data.datamodule.batch_size=16",
    "data.datamodule.num_workers=1",
    "data.datamodule.epoch_samples=128",
    "model.config.vision.width=32",
    "model.config.vision.layers=1",
    "model.config.vision.heads=2",
    "model.config.text.width=32",
    "model.config.text.layers=1",
    "model.config.text.heads=2",
    "model.config.text.intermediate_size=64",
    "callbacks.retrieval.max_items=48",
    "callbacks.retrieval.progress=false",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_"))}
    env.update(ERNIEVIL2_CACHE=str(cache), WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _cli(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "ernievil2_train", *TINY, f"hydra.run.dir={run_dir}", *overrides]


def _run(cmd: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _metric_rows(run_dir: Path, name: str) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get(name)]


def test_demo_run_logs_recall_to_csv_and_wandb_and_exports(demo_cache: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _run(_cli(run_dir, "trainer.max_epochs=2"), _env(demo_cache))
    assert result.returncode == 0, result.stderr[-3000:]
    recalls = _metric_rows(run_dir, "retrieval/mean_recall")
    assert len(recalls) == 3  # zero-shot baseline + one per epoch
    assert all(0.0 <= float(row["retrieval/mean_recall"]) <= 1.0 for row in recalls)
    assert {"retrieval/t2i/r@1", "retrieval/i2t/r@10"} <= set(recalls[-1])
    assert "retrieval (epoch 1)" in result.stdout + result.stderr
    wandb_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1 and any(wandb_runs[0].glob("*.wandb"))
    model = load_pretrained(run_dir / "export")
    assert (run_dir / "export" / "vocab.txt").is_file()
    assert model.config.vision.width == 32
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / ".hydra" / "overrides.yaml").read_text().splitlines() == [
        f"- {override}" for override in [*TINY, "trainer.max_epochs=2"]
    ]
    assert "max_epochs: 2" in (run_dir / ".hydra" / "config.yaml").read_text()
    assert f"dir: {run_dir}" in (run_dir / ".hydra" / "hydra.yaml").read_text()
    evaluate = _run(
        [sys.executable, "-m", "ernievil2_train.evaluate", "--checkpoint", str(run_dir / "export"),
         "--eval-set", str(next((demo_cache / "demo").glob("v*")) / "eval"), "--json"],
        _env(demo_cache),
    )
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    assert '"mean_recall"' in evaluate.stdout


def test_each_job_of_a_sweep_gets_its_own_wandb_run(demo_cache: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "ernievil2_train", "-m", *TINY, f"hydra.sweep.dir={sweep}",
           "trainer.max_steps=1", "callbacks.retrieval.max_items=8", "module.optimizer.lr=0.001,0.002"]
    result = _run(cmd, _env(demo_cache))
    assert result.returncode == 0, result.stderr[-3000:]
    for job, lr in (("0", "0.001"), ("1", "0.002")):
        runs = list((sweep / job / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1, job
        assert runs[0].stem == f"run-{(sweep / job / 'wandb_run_id.txt').read_text()}"
        assert f"module.optimizer.lr={lr}" in (sweep / job / ".hydra" / "overrides.yaml").read_text()


def test_a_refused_job_of_a_sweep_names_itself_and_says_the_sweep_stops(demo_cache: Path,
                                                                         tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "ernievil2_train", "-m", *TINY, f"hydra.sweep.dir={tmp_path / 'sweep'}",
           "logger=csv", "seed=-1,1"]
    result = _run(cmd, _env(demo_cache))
    assert result.returncode == 2, result.stderr[-3000:]
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: job 0 (") and "seed=-1" in last
    assert last.endswith(f"config key 'seed': must be from 0 to {2**32 - 1} (numpy's seeds), got -1; the "
                         "sweep stops here, the jobs after it do not run")
    assert not (tmp_path / "sweep" / "1").exists()


# 47 eval images: 24 on rank 0 (2 encoder calls of 23) and 23 on rank 1 (1 call) unless the slices are padded
UNEVEN_RETRIEVAL = ("callbacks.retrieval.max_items=47", "callbacks.retrieval.batch_size=23")
RECALL_KEYS = [f"retrieval/{d}/r@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)] + ["retrieval/mean_recall"]


def test_ddp_run_on_two_cpu_processes(demo_cache: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = _cli(run_dir, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
               "trainer.precision=32-true", "trainer.max_epochs=1", "logger=csv", *UNEVEN_RETRIEVAL)
    result = _run(cmd, _env(demo_cache), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stdout + result.stderr
    recalls = _metric_rows(run_dir, "retrieval/mean_recall")
    assert len(recalls) == 2
    single_dir = tmp_path / "single"
    single = _run(_cli(single_dir, "trainer.max_steps=1", "logger=csv",
                       *UNEVEN_RETRIEVAL), _env(demo_cache))
    assert single.returncode == 0, single.stderr[-3000:]
    baseline = _metric_rows(single_dir, "retrieval/mean_recall")[0]
    assert recalls[0]["step"] == baseline["step"] == "0"
    assert {k: float(recalls[0][k]) for k in RECALL_KEYS} == {k: float(baseline[k]) for k in RECALL_KEYS}
    folders = sorted(p.name for p in run_dir.iterdir() if p.is_dir())
    assert folders == [".hydra", "checkpoints", "csv", "export"]
    assert not list(tmp_path.glob("outputs")), "DDP children must not create their own run folders"
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 128 // (16 * 2)
    # where each rank's one loader stream stood, gathered from both ranks: 64 samples each
    assert last["MultiViewDataModule"]["stream_read"] == [[64], [64]]
    assert last["epoch_skipped"] == {"epoch": 0, "counts": [0] * len(SKIP_REASONS)}  # summed over ranks
    assert len(last["rng_state"]) == 2  # every rank's generators


@pytest.mark.parametrize("overrides", [
    ["module.accumulate_microbatches=2"],
    ["trainer.precision=bf16-mixed", "+module.optimizer.fused=true"],  # as the experiments train on a GPU
])
def test_the_default_clipping_runs_where_lightning_would_not_clip(overrides: list[str], demo_cache: Path,
                                                                  tmp_path: Path) -> None:
    result = _run(_cli(tmp_path / "run", "logger=csv", "trainer.max_steps=2", *overrides), _env(demo_cache))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gradients clipped by the module at 1.0" in result.stdout + result.stderr


def test_a_refused_resume_leaves_the_runs_config_record_alone(demo_cache: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    record = run_dir / ".hydra" / "config.yaml"
    record.parent.mkdir()
    record.write_text("the run's own config\n")
    result = _run(_cli(run_dir, "trainer.max_epochs=3"), _env(demo_cache))
    assert result.returncode == 2
    assert "run folder checkpoint" in result.stderr
    assert record.read_text() == "the run's own config\n"
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml"]


def test_a_resume_names_the_optimizer_settings_it_keeps_and_refuses_other_groups(demo_cache: Path,
                                                                                 tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = _run(_cli(run_dir, "logger=csv", "trainer.max_steps=1"), _env(demo_cache))
    assert first.returncode == 0, first.stderr[-3000:]
    changed = _run(_cli(run_dir, "logger=csv", "trainer.max_steps=2", "module.optimizer.lr=0.01"),
                   _env(demo_cache))
    assert changed.returncode == 0, changed.stderr[-3000:]
    output = changed.stdout + changed.stderr
    assert "changed settings have no effect: lr 0.001 there, 0.01 here (all " in output
    assert ("resuming a run whose lr schedule was laid out for 1 optimizer steps with one of 2 "
            "(trainer.max_epochs or max_steps, the batch size, epoch_samples or the number of processes "
            "changed)") in output
    assert "not resumable" not in output and "exists and is not empty" not in output  # Lightning's notices
    refused = _run(_cli(run_dir, "logger=csv", "trainer.max_steps=3", "module.layer_decay=0.8"),
                   _env(demo_cache))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: run folder checkpoint: {run_dir / 'checkpoints' / 'last.ckpt'}: its "
                           f"optimizer state has other parameter groups than this run's"), last


def test_fine_tuning_on_a_few_pairs_of_your_own_runs_as_the_readme_says(demo_cache: Path,
                                                                          tmp_path: Path) -> None:
    """The README's steps: a TSV per split, a recipe run per split, the fine-tuning experiment on CPU; a set
    of one shard with the experiment's 8 loader workers and its warmup."""
    demo_root = next(p for p in (demo_cache / "demo").iterdir() if p.is_dir() and not p.name.startswith("."))
    for split, count in (("train", 12), ("valid", 6)):
        rows = []
        for i in range(count):
            image = tmp_path / f"{split}{i}.png"
            image.write_bytes(image_bytes((20 * i, 250 - 20 * i, 90), fmt="PNG"))
            rows.append(f"{image}\t一只猫 {split} {i}\t猫\n")
        (tmp_path / f"{split}.tsv").write_text("".join(rows), encoding="utf-8")
        split_flag = ["--split", split] if split != "train" else []
        recipe = _run([sys.executable, "-m", "data_recipes.tsv", "--input", str(tmp_path / f"{split}.tsv"),
                       "--out", str(tmp_path / "mine"), *split_flag], _env(demo_cache))
        assert recipe.returncode == 0, recipe.stderr[-3000:]
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", demo_root / "vocab.txt")
    run_dir = tmp_path / "run"
    result = _run([sys.executable, "-m", "ernievil2_train", "+experiment=finetune_cococn",
                   f"model.checkpoint={checkpoint}", f"data.train_shards={tmp_path / 'mine'}",
                   f"data.eval_set={tmp_path / 'mine' / 'eval'}", "trainer=cpu", "logger=csv",
                   "trainer.max_epochs=1", f"data.image_size={TINY_MODEL['vision']['image_size']}",
                   "module.compile=false",  # torch.compile would spend a minute building CPU kernels
                   "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"],
                  _env(demo_cache), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "loading with 1 worker(s) per rank instead of num_workers=8" in output
    assert "across ranks is zero" not in output  # no validation shards: Lightning's note is not shown
    assert len(_metric_rows(run_dir, "retrieval/mean_recall")) == 2  # the baseline and the epoch
    assert (run_dir / "export" / "model.safetensors").is_file()
    assert "an epoch has 1 training step(s), fewer than trainer.log_every_n_steps=10" in output
    assert _metric_rows(run_dir, "train/loss")  # logged although the epoch is shorter than 10 steps


def test_a_run_without_eval_set_or_logger_trains_and_exports_the_final_model(demo_cache: Path,
                                                                              tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _run(_cli(run_dir, "data.eval_set=null", "logger=[]", "trainer.max_epochs=1"), _env(demo_cache))
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "no eval set: no checkpoint of the best epoch by retrieval/mean_recall" in output
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    assert (run_dir / "export" / "model.safetensors").is_file()


def test_missing_required_value_is_one_line_and_exit_2(demo_cache: Path, tmp_path: Path) -> None:
    result = _run([sys.executable, "-m", "ernievil2_train", "+experiment=finetune_cococn",
                   f"hydra.run.dir={tmp_path}"], _env(demo_cache))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: missing required config values 'data.train_shards', 'data.eval_set', "
                     "'model.checkpoint': set them on the command line, e.g. data.train_shards=/path/to/it"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.datamodule.batch_size=abc", "config key 'data.datamodule.batch_size': expected int"),
        ("module.optimizer.lr=-1", "module.optimizer: Invalid learning rate: -1"),
        ("module.optimizer.lr=abc", "config key 'module.optimizer.lr': expected float, got 'abc'"),
        ("module.optimizer._target_=torch.optim.AdamQ",
         "config key 'module.optimizer._target_': torch.optim.AdamQ not found (torch.optim has no 'AdamQ')"),
        ("module.accumulate_microbatches=3", "config key 'module.accumulate_microbatches': 3 does not"),
        ("data.image_size=320000", "config key 'model': the model's weights need"),
        ("data.datamodule.train_shards={garbage}", "train_shards: a pass over this worker's shards gave no"),
        ("data.datamodule.views.tags=false",
         "module.loss.weights.image_tags > 0 needs batch key 'tag_ids'"),
        ("trainer.val_check_interval=100000",
         "config key 'trainer.val_check_interval': 100000 batches is more than the 8 of an epoch"),
        ("callbacks.retrieval.image_size=48",
         "config key 'callbacks.retrieval.image_size': 48, but the model takes 32-pixel images"),
        ("+trainer.accumulate_grad_batches=2",
         "config key 'trainer.accumulate_grad_batches': 2 does not give"),
        ("+trainer.gradient_clip_algorithm=value",
         "config key 'trainer.gradient_clip_algorithm': 'value', but gradients are clipped by their"),
        ("callbacks.model_checkpoint.monitor=retrieval/mean_recal",
         "config key 'callbacks.model_checkpoint.monitor': this run never logs 'retrieval/mean_recal'; "
         "did you mean 'retrieval/mean_recall'?"),
        ("+callbacks.model_checkpoint.every_n_train_steps=2",
         "config key 'callbacks.model_checkpoint.every_n_train_steps': retrieval/mean_recall is logged at "
         "the end of each training epoch only; remove it"),
        ("callbacks.model_checkpoint.monitor=my_metric",
         "config key 'callbacks.model_checkpoint.monitor': no metric 'my_metric' was logged by the epoch's "
         "end; the run logged train/loss,"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(override: str, message: str, demo_cache: Path,
                                               tmp_path: Path) -> None:
    garbage = tmp_path / "train-000000.tar"
    garbage.write_bytes(bytes(range(256)) * 40)
    result = _run(_cli(tmp_path / "run", "logger=csv", override.format(garbage=garbage)), _env(demo_cache))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith(f"error: {message}"), result.stderr[-3000:]
    if any(word in override for word in ("views", "mean_recal", "every_n", "image_size=48")):
        assert "zero-shot baseline" not in result.stdout + result.stderr  # refused at start-up, not later
    if any(word in override for word in ("lr=", "batch_size", "microbatches", "image_size=", "AdamQ")):
        assert result.stdout.strip() == "" and len(result.stderr.strip().splitlines()) == 1  # nothing else
    if "my_metric" in override:  # a name the project does not know is told at the epoch's end, and the
        assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()  # last checkpoint is kept
    late = ("my_metric", "{garbage}", "val_check_interval=100000")  # told once training has begun
    if not any(word in override for word in late):  # refused before the run wrote anything: no run folder of
        assert not (tmp_path / "run").exists()      # only a log file is left behind


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["trainer.max_epochz=1"],
         "error: Could not override 'trainer.max_epochz'; "
         "to append to your config use +trainer.max_epochz=1"),
        (["logger=nope"],
         "error: In 'train': Could not find 'logger/nope'; available: csv, tensorboard, wandb"),
        (["+max_epochs=3"],  # what Hydra's own hint above leads to
         "error: config key 'max_epochs' (added by +max_epochs=3) is read by nothing, so it would change "
         "nothing; did you mean 'trainer.max_epochs'? (++max_epochs=3 keeps it as a note in the run's "
         "config)"),
        (["trainer.max_epochs=[1"],
         "error: cannot parse override 'trainer.max_epochs=[1': no viable alternative at input '[1'"),
        (["data.image_size=${nope}"],
         "error: config key 'data.datamodule.image_size': Interpolation key 'nope' not found"),
        (["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=2"],
         "error: hydra/launcher=slurm submits SLURM jobs only with -m (multirun); without it the run would "
         "train here, on this machine"),
        (["-m", "hydra/launcher=slurm", "trainer=ddp", "module.optimizer.lr=1e-5,2e-5"],
         "error: trainer.devices is 'auto': the SLURM launcher needs the GPUs per node as a number "
         "(set trainer.devices=N)"),
        (["--cfg", "hydra", "-m", "trainer.max_epochs=1,2"],
         "error: Only one of --run, --multirun, --cfg, --info and --shell_completion can be specified"),
        (["--resolve"], "error: The --resolve flag can only be used in conjunction with --cfg or --help"),
    ],
)
def test_config_errors_of_hydra_are_one_line_and_exit_2(overrides: list[str], line: str, demo_cache: Path,
                                                         tmp_path: Path) -> None:
    """An unknown key or group option, an override Hydra cannot parse, an interpolation it cannot resolve."""
    result = _run([sys.executable, "-m", "ernievil2_train", *overrides, f"hydra.run.dir={tmp_path}",
                   f"hydra.sweep.dir={tmp_path}"], _env(demo_cache))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert [text for text in result.stderr.splitlines() if text.strip()][-1] == line


def test_hydra_full_error_keeps_hydras_own_report(demo_cache: Path, tmp_path: Path) -> None:
    result = _run([sys.executable, "-m", "ernievil2_train", "logger=nope", f"hydra.run.dir={tmp_path}"],
                  _env(demo_cache, HYDRA_FULL_ERROR="1"))
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "Available options in 'logger'" in result.stderr


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else "process ended"
        try:
            if any(int(r["step"]) >= step for r in _metric_rows(run_dir, "train/loss")):
                return
        except (FileNotFoundError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"training did not reach step {step} in {timeout} s")


def _global_step(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])


def _adam_steps(ckpt: Path) -> set[int]:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    return {int(s["step"]) for s in state["optimizer_states"][0]["state"].values()}


LONG_EPOCH = ["data.datamodule.epoch_samples=4096", "trainer.log_every_n_steps=1",
              "++logger.csv.flush_logs_every_n_steps=1", "logger=csv"]


def test_sigterm_mid_epoch_then_resume_continues_exactly(demo_cache: Path, tmp_path: Path) -> None:
    """Stopped mid-epoch and resumed, the run logs the losses of the same run left alone, step for step:
    same batches (the resumed epoch reads the rest of its own stream), same dropout masks, same updates."""
    steps = [*LONG_EPOCH, "trainer.max_steps=64"]
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_cli(run_dir, *steps), env=_env(demo_cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]  # stopped, not finished
    assert "Received SIGTERM" not in stderr and "was raised with message" not in stderr  # Lightning's notes
    stopped = (f"stopped by SIGTERM after saving a checkpoint; the same command with hydra.run.dir={run_dir} "
               "resumes the run")
    assert stderr.strip().splitlines()[-1] == stopped
    log = run_dir / "ernievil2_train.log"
    assert log.read_text().splitlines()[-1].endswith(f"[ERROR] {stopped}")  # found there later
    last = run_dir / "checkpoints" / "last.ckpt"
    interrupted = _global_step(last)
    assert 3 <= interrupted < 64, "the interruption must land mid-epoch, before the end"
    assert _adam_steps(last) == {interrupted}

    # the rest of the epoch, read in batches of another size, would end early: refused, the run untouched
    records = [run_dir / ".hydra" / "config.yaml", run_dir / ".hydra" / "overrides.yaml",
               run_dir / "csv" / "hparams.yaml"]
    before = [path.read_text() for path in records]
    other = _run(_cli(run_dir, *steps, "ckpt_path=last", "data.datamodule.batch_size=32"), _env(demo_cache))
    assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr[-3000:]
    refusal = "error: config key 'data.datamodule.batch_size': 32, but 16 in the checkpoint being resumed"
    assert other.stderr.strip().splitlines()[-1].startswith(refusal)
    assert f"[ERROR] {refusal}" in log.read_text().splitlines()[-1]
    assert _global_step(last) == interrupted
    assert [path.read_text() for path in records] == before

    resumed = _run(_cli(run_dir, *steps, "ckpt_path=last"), _env(demo_cache))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _global_step(last) == 64
    assert _adam_steps(last) == {64}
    alone = _run(_cli(tmp_path / "alone", *steps), _env(demo_cache))
    assert alone.returncode == 0, alone.stderr[-3000:]

    def losses(folder: Path) -> list[tuple[str, str]]:
        return [(row["step"], row["train/loss"]) for row in _metric_rows(folder, "train/loss")]

    assert len(losses(run_dir)) == 64
    assert losses(run_dir) == losses(tmp_path / "alone")


def test_ctrl_c_ends_training_with_one_line_and_the_resume_command(demo_cache: Path, tmp_path: Path) -> None:
    """Lightning shuts down on Ctrl-C (the last checkpoint saves on it) and exits with status 1; the run ends
    with 130, as every tool, and one line saying what `ckpt_path=last` resumes from."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_cli(run_dir, *LONG_EPOCH, "trainer.max_steps=64"), env=_env(demo_cache),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=with_ctrl_c)
    _wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    resume = f"ckpt_path=last hydra.run.dir={run_dir} resumes from {run_dir / 'checkpoints' / 'last.ckpt'}"
    expected = f"interrupted: {resume}"
    assert last == expected, stderr[-3000:]
    assert "Traceback" not in stderr


def test_slurm_requeue_signal_saves_requeues_and_restart_resumes(demo_cache: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "777", "SLURM_JOB_NAME": "ernievil2", "SLURM_NTASKS": "1", "SLURM_NNODES": "1",
             "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODELIST": "localhost",
             "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run_dir = tmp_path / "run"
    env = _env(demo_cache, **slurm)
    proc = subprocess.Popen(_cli(run_dir, *LONG_EPOCH), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGUSR1)
    proc.communicate(timeout=120)  # it saves at the next step boundary, requeues and stops by itself
    assert proc.returncode == 0
    assert calls.read_text().split() == ["requeue", "777"]
    hpc = sorted(run_dir.glob("hpc_ckpt_*.ckpt"))
    assert len(hpc) == 1
    saved = _global_step(hpc[0])
    assert saved >= 3

    target = saved + 3
    restart = _run(_cli(run_dir, *LONG_EPOCH, f"trainer.max_steps={target}"), env)
    assert restart.returncode == 0, restart.stderr[-3000:]
    assert _global_step(run_dir / "checkpoints" / "last.ckpt") == target
    assert _adam_steps(run_dir / "checkpoints" / "last.ckpt") == {target}
    # one run's log, step for step: the step the requeue stopped at is in it too
    assert [int(row["step"]) for row in _metric_rows(run_dir, "train/loss")] == list(range(target))


def test_resampled_shards_with_no_usable_sample_stop_with_one_line(demo_cache: Path, tmp_path: Path) -> None:
    """Resampling draws shards forever: a corrupt tar as the only shard must still end the run, with one
    error line and exit code 2, not a hang at 0 batches."""
    garbage = tmp_path / "train-000000.tar"
    garbage.write_bytes(bytes(range(256)) * 40)
    vocab = next((demo_cache / "demo").glob("v*")) / "vocab.txt"
    cmd = _cli(tmp_path / "run", "data=shards", f"data.train_shards={garbage}", f"data.vocab_file={vocab}",
               "data.eval_set=null", "callbacks.retrieval=null", "data.datamodule.resampled=true",
               "data.datamodule.epoch_samples=64", "logger=csv")
    result = _run(cmd, _env(demo_cache), timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: train_shards: 256 shards drawn in a row gave no usable sample (every shard "
                      "corrupt, or no sample with an image and a caption)"], result.stderr[-3000:]
    assert result.stderr.rstrip().splitlines()[-1] == errors[0]


def test_a_diverged_training_ends_with_one_line(demo_cache: Path, tmp_path: Path) -> None:
    """A learning rate that sends the weights to NaN: the epoch's retrieval finds NaN embeddings and the run
    ends with one line saying what happened and what to do, exit status 1."""
    run = _run(_cli(tmp_path / "run", "module.optimizer.lr=1e30", "trainer.max_epochs=1", "logger=csv"),
               _env(demo_cache))
    assert run.returncode == 1, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the model gives NaN or infinite embeddings after "), run.stderr[-3000:]
    assert (tmp_path / "run" / "ernievil2_train.log").read_text().splitlines()[-1].endswith(f"[ERROR] {last}")
    assert "Traceback" not in run.stderr and "was raised with message" not in run.stdout + run.stderr


def test_an_error_during_validation_ends_the_run_instead_of_waiting_for_its_loader_workers(
        demo_cache: Path, tmp_path: Path) -> None:
    """The workers ignore SIGTERM (the main process stops them), so the exit would wait for them for ever."""
    cmd = _cli(tmp_path / "run", "logger=csv", "+callbacks.fail._target_=tests.app_helpers.FailsInValidation")
    result = _run(cmd, _env(demo_cache), timeout=120)
    assert result.returncode == 1
    assert "planted failure in validation" in result.stderr
    log = (tmp_path / "run" / "ernievil2_train.log").read_text()
    assert "[ERROR] the run failed\nTraceback" in log and "planted failure in validation" in log


def test_a_run_folder_that_cannot_be_made_is_one_line(demo_cache: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    run = _run(_cli(blocker / "run"), _env(demo_cache), timeout=120)
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.strip() == (
        f"error: hydra.run.dir: cannot create the run folder or its log ({blocker / 'run'}: Not a directory)"
    )
