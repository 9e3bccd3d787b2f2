"""`python -m ernievil2_train [overrides]`: the Hydra training entry point."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from ernievil2_train.config_checks import ConfigError
from ernievil2_train.resolvers import register_resolvers

register_resolvers()


def _message(error: Exception) -> str:
    """The error's own message; for one re-raised from a DataLoader worker, the original's last line."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    return last.removeprefix(f"{type(error).__module__}.{type(error).__qualname__}: ")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from ernievil2_train.train import train

    try:
        train(cfg)
    except ConfigError as error:
        print(f"error: {_message(error)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
