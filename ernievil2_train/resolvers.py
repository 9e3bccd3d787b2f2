"""OmegaConf resolvers used by the configs in `conf/`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


def demo_data(cache_dir: str) -> str:
    """`${demo_data:DIR}`: the built-in demo set under DIR, generated on first use."""
    from data_recipes.demo import ensure_demo

    return str(ensure_demo(Path(cache_dir)))


def vocab_size(vocab_file: str) -> int:
    """`${vocab_size:FILE}`: the embedding-table size a vocab needs (largest id + 1)."""
    from ernievil2_train.text.vocab import load_vocab

    return max(load_vocab(vocab_file).values()) + 1


def slurm_tasks_per_node(devices: Any) -> int:
    """`${slurm_tasks_per_node:${trainer.devices}}`: the tasks (one per GPU) the SLURM launcher asks for on
    each node; a number, on a machine that can submit to SLURM."""
    from ernievil2_train.config_checks import ConfigError

    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ConfigError(
            f"trainer.devices is {devices!r}: the SLURM launcher needs the GPUs per node as a number "
            "(set trainer.devices=N)"
        )
    if shutil.which("srun") is None:
        raise ConfigError("srun not found: hydra/launcher=slurm submits jobs to SLURM; run it on the cluster")
    return devices


def register_resolvers() -> None:
    cached = (("demo_data", demo_data, True), ("vocab_size", vocab_size, True),
              ("slurm_tasks_per_node", slurm_tasks_per_node, False))  # checks the machine each time
    for name, resolver, use_cache in cached:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver, use_cache=use_cache)
