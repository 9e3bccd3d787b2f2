"""`python -m ernievil2_train [overrides]`: the Hydra training entry point."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from ernievil2_train.config_checks import ConfigError
from ernievil2_train.resolvers import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from ernievil2_train.train import train

    try:
        train(cfg)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
