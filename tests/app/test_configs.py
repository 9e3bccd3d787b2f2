"""Every experiment composes with Hydra's compose API, and every `_target_` in it instantiates."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from unittest.mock import patch

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError
from torch.utils.data import DataLoader

from ernievil2_train.config_checks import ConfigError, check_config
from ernievil2_train.resolvers import register_resolvers
from ernievil2_train.train import build, check_data_fits_model
from tests.app_helpers import TINY_MODEL, tiny_checkpoint
from tests.conftest import REPO_ROOT

CONF = REPO_ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
COMMAND = re.compile(r"(?:python -m ernievil2_train|sbatch launch/train\.sbatch)(?=\s|`|$)")
DOC_PATTERNS = ("*.md", "docs/*.md", "bench/*.md", "launch/*", "conf/**/*.yaml", "ernievil2_train/**/*.py")
DOCS = sorted(
    str(path.relative_to(REPO_ROOT))
    for pattern in DOC_PATTERNS
    for path in REPO_ROOT.glob(pattern)
    if COMMAND.search(path.read_text(encoding="utf-8"))
)
BRACE_EXAMPLES = ["README.md", "conf/data/shards.yaml", "conf/experiment/finetune_cococn.yaml",
                  "conf/experiment/pretrain_multiview.yaml", "launch/train.sbatch"]


def _compose(overrides: list[str], output_dir: Path) -> DictConfig:
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg.hydra
    return cfg


def _real_data_overrides(demo_root: Path) -> list[str]:
    return [
        f"data.train_shards={demo_root}",
        f"data.eval_set={demo_root / 'eval'}",
        f"data.vocab_file={demo_root / 'vocab.txt'}",
    ]


def _instantiate_all(cfg: DictConfig) -> dict[str, object]:
    """Everything `train` builds, through its `build` (which checks every value's type first)."""
    built = {
        "datamodule": build("data.datamodule", cfg.data.datamodule),
        "model": build("model", cfg.model),
        "callbacks": [build(f"callbacks.{k}", c) for k, c in cfg.callbacks.items() if c],
        "loggers": [build(f"logger.{k}", c) for k, c in cfg.logger.items() if c],
    }
    check_data_fits_model(built["datamodule"], built["model"])
    built["module"] = build("module", cfg.module, model=built["model"])
    built["trainer"] = build("trainer", cfg.trainer, callbacks=built["callbacks"], logger=built["loggers"])
    return built


def test_experiments_are_found() -> None:
    assert {"demo", "finetune_cococn", "pretrain_multiview"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(
    experiment: str, demo_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    demo_root = next(p for p in (demo_cache / "demo").iterdir() if p.is_dir() and not p.name.startswith("."))
    overrides = [f"+experiment={experiment}", f"paths.cache_dir={demo_cache}"]
    if experiment != "demo":
        overrides += _real_data_overrides(demo_root)
    if experiment == "finetune_cococn":
        overrides.append(f"model.checkpoint={tiny_checkpoint(tmp_path / 'ckpt', demo_root / 'vocab.txt')}")
        overrides.append(f"data.image_size={TINY_MODEL['vision']['image_size']}")  # the checkpoint's size
    if experiment == "pretrain_multiview":  # the Base preset is real-sized; shrink it for the test
        overrides += ["++model.config.vision.layers=1", "++model.config.text.layers=1"]
    overrides += ["trainer.accelerator=cpu", "trainer.precision=32-true"]  # this machine has no GPU
    cfg = _compose(overrides, tmp_path / "run")
    check_config(cfg)
    OmegaConf.resolve(cfg)
    built = _instantiate_all(cfg)
    assert built["module"].model is built["model"]
    assert built["trainer"].default_root_dir == str(tmp_path / "run")


def test_default_run_is_the_demo(demo_cache: Path, tmp_path: Path) -> None:
    plain = _compose([f"paths.cache_dir={demo_cache}"], tmp_path)
    demo = _compose([f"paths.cache_dir={demo_cache}", "+experiment=demo"], tmp_path)
    for key in ("data", "model", "module"):
        expected = OmegaConf.to_container(demo[key], resolve=True)
        assert OmegaConf.to_container(plain[key], resolve=True) == expected


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["+experiment=finetune_cococn"], "data.train_shards"),
        (["+experiment=pretrain_multiview", "data.train_shards=/x", "data.eval_set=/y"], "data.vocab_file"),
    ],
)
def test_missing_required_value_names_the_key(overrides: list[str], key: str, tmp_path: Path) -> None:
    cfg = _compose(overrides, tmp_path)
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        check_config(cfg)


@pytest.mark.parametrize(("override", "message"), [
    *((f"seed={seed}", "'seed': expected an integer, got") for seed in ("abc", "1.5", "true", "null")),
    ("module=null", "'module': null, but a run needs it"),
    *((f"seed={seed}", f"'seed': must be from 0 to {2**32 - 1}") for seed in ("-1", str(2**32))),
    *((f"trainer.gradient_clip_val={clip}", "'trainer.gradient_clip_val': must be 0 or")
      for clip in ("-1", "inf", "abc")),
    ("trainer.check_val_every_n_epoch=0", "'trainer.check_val_every_n_epoch': must be 1 or more, got 0"),
    *((f"trainer.{limit}=0", f"'trainer.{limit}': 0 trains nothing (a checkpoint's zero-shot recall "
       "without training: python -m ernievil2_train.evaluate)") for limit in ("max_epochs", "max_steps")),
    *((f"+trainer.accumulate_grad_batches={k}",
       f"'trainer.accumulate_grad_batches': must be 1 or more, got {k}") for k in ("0", "-2")),
    *((f"trainer.val_check_interval={v}", f"'trainer.val_check_interval': an integer of batches (1 or more) "
       f"or a share of the epoch (a float in (0, 1]), got {got}")
      for v, got in (("0", 0), ("-1", -1), ("0.0", 0.0), ("2.0", 2.0), ("true", True))),
])
def test_a_bad_value_names_the_key(override: str, message: str, demo_cache: Path, tmp_path: Path) -> None:
    cfg = _compose([override, f"paths.cache_dir={demo_cache}"], tmp_path)
    with pytest.raises(ConfigError, match=re.escape(f"config key {message}")):
        check_config(cfg)


@pytest.mark.parametrize("interval", ["1", "250", "0.25", "1.0"])
def test_every_validation_interval_lightning_counts_is_taken(interval: str, demo_cache: Path,
                                                             tmp_path: Path) -> None:
    overrides = [f"trainer.val_check_interval={interval}", f"paths.cache_dir={demo_cache}"]
    check_config(_compose(overrides, tmp_path))


@pytest.mark.parametrize("limits", [["trainer.max_epochs=-1", "trainer.max_steps=5"],
                                    ["trainer.max_epochs=1"]])
def test_every_training_length_lightning_counts_is_taken(limits: list[str], demo_cache: Path,
                                                         tmp_path: Path) -> None:
    check_config(_compose([*limits, f"paths.cache_dir={demo_cache}"], tmp_path))


@pytest.mark.parametrize("seed", ["0", str(2**32 - 1)])
def test_every_seed_numpy_takes_is_taken(seed: str, demo_cache: Path, tmp_path: Path) -> None:
    check_config(_compose([f"seed={seed}", f"paths.cache_dir={demo_cache}"], tmp_path))


@pytest.mark.parametrize(("override", "message"), [
    ("callbacks.export.dirpath={path}", "'callbacks.export.dirpath': {path} is a file, not a folder"),
    ("callbacks.model_checkpoint.dirpath={path}", "'callbacks.model_checkpoint.dirpath': {path} is a file"),
    ("logger.wandb.save_dir={path}", "'logger.wandb.save_dir': {path} is a file, not a folder"),
])
def test_an_output_folder_that_is_a_file_names_the_key(override: str, message: str, demo_cache: Path,
                                                       tmp_path: Path) -> None:
    """Refused before training, not at the first save."""
    file = tmp_path / "a_file"
    file.write_text("")
    cfg = _compose([override.format(path=file), f"paths.cache_dir={demo_cache}"], tmp_path / "run")
    with pytest.raises(ConfigError, match=re.escape(f"config key {message.format(path=file)}")):
        check_config(cfg)
    folder = _compose([override.format(path=tmp_path), f"paths.cache_dir={demo_cache}"], tmp_path / "run")
    check_config(folder)


def test_an_empty_cache_folder_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty `ERNIEVIL2_CACHE` would put the demo set at the top of the file system."""
    monkeypatch.setenv("ERNIEVIL2_CACHE", "")
    cfg = _compose([], tmp_path)
    with pytest.raises(ConfigError, match=re.escape("config key 'paths.cache_dir': empty")):
        check_config(cfg)


def test_a_missing_path_made_from_another_key_names_that_key(demo_cache: Path, tmp_path: Path) -> None:
    """`model.checkpoint` given as a file: the vocabulary path made from it is not there, and the error says
    which key it was made from."""
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_text("")
    cfg = _compose(["model=pretrained", f"model.checkpoint={checkpoint}", f"paths.cache_dir={demo_cache}"],
                   tmp_path)
    message = (f"'data.vocab_file': path not found: {checkpoint}/vocab.txt (made from ${{model.checkpoint}}/"
               f"vocab.txt); {checkpoint} is a file, not a folder")
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(cfg)
    paddle = tmp_path / "model.pdparams"  # the official file, which is to be converted first
    paddle.write_text("")
    cfg = _compose(["model=pretrained", f"model.checkpoint={paddle}", f"paths.cache_dir={demo_cache}"],
                   tmp_path)
    message = (f"; {paddle} is a Paddle checkpoint file: convert it into a checkpoint folder first "
               f"(python -m ernievil2_train.convert {paddle} DIR)")
    with pytest.raises(ConfigError, match=re.escape(message) + "$"):
        check_config(cfg)


def test_missing_path_names_the_key(demo_cache: Path, tmp_path: Path) -> None:
    cfg = _compose(
        ["+experiment=finetune_cococn", "data.train_shards='/no/such/{000..009}.tar'", "data.eval_set=/e",
         "model.checkpoint=/m"],
        tmp_path,
    )
    with pytest.raises(ConfigError, match=re.escape("'data.train_shards'")):
        check_config(cfg)


def _documented_commands(path: Path) -> list[str]:
    """The arguments of each `python -m ernievil2_train` / `sbatch launch/train.sbatch` command `path` shows,
    as written (comment marks of continuation lines taken off)."""
    commands, lines = [], iter(path.read_text(encoding="utf-8").splitlines())
    for line in lines:
        for match in COMMAND.finditer(line):
            text = line[match.end():]
            if line[:match.start()].endswith("`"):
                text = text.split("`", 1)[0]
            while text.endswith("\\"):
                text = text[:-1] + next(lines).lstrip("# ")
            commands.append(text)
    return commands


def _shell_words(text: str, cwd: Path) -> list[str]:
    """The arguments bash passes on for `text` (quotes taken off, braces and globs expanded)."""
    shell = subprocess.run(["bash", "-c", f"printf '%s\\0' {text}"], cwd=cwd, capture_output=True, text=True,
                           check=True, timeout=30)
    return [word for word in shell.stdout.split("\0") if word]


def test_documented_brace_patterns_are_checked() -> None:
    braced = {doc for doc in DOCS if any("{" in c for c in _documented_commands(REPO_ROOT / doc))}
    assert set(BRACE_EXAMPLES) <= braced


@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_compose(doc: str, tmp_path: Path) -> None:
    """Every documented command, as the shell passes it on, composes; its brace patterns reach the config."""
    for command in _documented_commands(REPO_ROOT / doc):
        words = [w for w in _shell_words(command, tmp_path) if "=" in w or w.startswith("~")]
        overrides = OverridesParser.create().parse_overrides(words)
        keys = [o.get_key_element() for o in overrides]
        assert len(keys) == len(set(keys)), f"{doc}: a key is set twice in {command}"
        single = [f"{o.get_key_element()}={next(o.sweep_string_iterator())}" if o.is_sweep_override()
                  else o.input_line for o in overrides]  # a sweep composes with its first value
        cfg = _compose(single, tmp_path)
        for override in overrides:
            if "{" in override.input_line:
                assert "{" in OmegaConf.select(cfg, override.key_or_group), f"{doc}: {override.input_line}"


def test_remote_shards_are_not_checked_as_paths(demo_cache: Path, tmp_path: Path) -> None:
    overrides = ["+experiment=pretrain_multiview", "data.train_shards=https://example.org/pairs/train.json",
                 f"data.vocab_file={tmp_path}", f"data.eval_set={tmp_path}"]
    check_config(_compose(overrides, tmp_path))
    overrides[1] = "data.train_shards=/no/such/train.json"
    with pytest.raises(ConfigError, match=re.escape("'data.train_shards': path not found")):
        check_config(_compose(overrides, tmp_path))


def _option_node(group: str, option: str) -> DictConfig:
    """A group option's YAML as Hydra places it: the same group's defaults first, then the file itself."""
    node = OmegaConf.load(CONF / group / f"{option}.yaml")
    merged = OmegaConf.create()
    for parent in node.pop("defaults", []):
        if parent != "_self_":
            merged = OmegaConf.merge(merged, _option_node(group, parent))
    return OmegaConf.merge(merged, node)


@pytest.mark.parametrize(("group_option", "package"), [
    ("trainer=ddp", "trainer"), ("trainer=fsdp", "trainer"), ("trainer=gpu", "trainer"),
    ("logger=tensorboard", "logger"), ("logger=csv", "logger"), ("loss=clip", "module.loss"),
    ("model=ernie_vil2_large", "model"),
])
def test_group_options_compose(group_option: str, package: str, demo_cache: Path, tmp_path: Path) -> None:
    """The chosen option's file, and nothing of the default option's, lands where the code reads it."""
    cfg = _compose([group_option, f"paths.cache_dir={demo_cache}"], tmp_path)
    assert OmegaConf.to_container(cfg, resolve=True)
    group, option = group_option.split("=")
    expected = OmegaConf.to_container(_option_node(group, option))
    placed = OmegaConf.select(cfg, package)
    assert placed is not None, f"{group_option}: nothing at {package}"
    assert OmegaConf.to_container(placed) == expected
    chosen = {k: v for entry in OmegaConf.load(CONF / "train.yaml").defaults if isinstance(entry, DictConfig)
              for k, v in entry.items()}
    assert expected != OmegaConf.to_container(_option_node(group, chosen[group]))  # the option changes things


def test_runs_started_in_the_same_second_get_folders_of_their_own(demo_cache: Path) -> None:
    """Two runs a script started in one second shared a run folder: interleaved metrics, one export."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.cache_dir={demo_cache}"], return_hydra_config=True)
    for folder in (Path(cfg.hydra.run.dir).name, Path(cfg.hydra.sweep.dir).name):
        assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{6}", folder), folder


def test_slurm_launcher_config_composes(demo_cache: Path) -> None:
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", f"paths.cache_dir={demo_cache}"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    with patch("shutil.which", lambda name: f"/usr/bin/{name}"):
        assert launcher.tasks_per_node == launcher.gpus_per_node == cfg.trainer.devices
    without_slurm = pytest.raises(InterpolationResolutionError, match="srun not found")
    with patch("shutil.which", lambda name: None), without_slurm:
        _ = launcher.tasks_per_node
    assert launcher.signal_delay_s > 0


class _RecallByEpoch(pl.LightningModule):
    """Logs a made-up `retrieval/mean_recall` per epoch (best in epoch 1) while training one weight."""

    RECALL = (0.5, 0.7, 0.6)

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.weight - batch.sum()) ** 2

    def on_train_epoch_end(self) -> None:
        self.log("retrieval/mean_recall", self.RECALL[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_checkpoints_keep_the_best_and_the_last_epoch(tmp_path):
    """The configured checkpoint callbacks: `best-*` follows the monitor, `last.ckpt` is always the newest."""
    cfg = _compose([], tmp_path)
    callbacks = [instantiate(cfg.callbacks[name]) for name in ("model_checkpoint", "last_checkpoint")]
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, callbacks=callbacks,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_RecallByEpoch(), train_dataloaders=DataLoader(torch.ones(4, 1), batch_size=2))
    saved = {p.name: torch.load(p, weights_only=True)["epoch"] for p in (tmp_path / "checkpoints").iterdir()}
    assert saved == {"best-epoch001.ckpt": 1, "last.ckpt": 2}
