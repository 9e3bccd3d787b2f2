"""OmegaConf resolvers used by the configs in `conf/`."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def demo_data(cache_dir: str) -> str:
    """`${demo_data:DIR}`: the built-in demo set under DIR, generated on first use."""
    from data_recipes.demo import ensure_demo

    return str(ensure_demo(Path(cache_dir)))


def vocab_size(vocab_file: str) -> int:
    """`${vocab_size:FILE}`: the embedding-table size a vocab needs (largest id + 1)."""
    from ernievil2_train.text import ErnieTokenizer

    return ErnieTokenizer(vocab_file).vocab_size


def register_resolvers() -> None:
    for name, resolver in (("demo_data", demo_data), ("vocab_size", vocab_size)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver, use_cache=True)
