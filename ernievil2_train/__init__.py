"""ernievil2-train: train, evaluate and ship ERNIE-ViL 2.0-style dual encoders."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_pretrained"]


def __getattr__(name: str):
    # Lazy so that `import ernievil2_train` stays cheap inside data workers.
    if name == "load_pretrained":
        from ernievil2_train.checkpoints.io import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'ernievil2_train' has no attribute {name!r}")
