"""What every checkpoint reader says when a file cannot be read or does not fit the model: the one-line
`CheckpointError`, a short reason for a library's exception, and the comparison of saved weights with a
model's state dict."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ernievil2_train.models.dual_encoder import loadable_shape

ZIP_MAGIC = b"PK\x03\x04"  # what `torch.save` files start with


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model (message is one line)."""


def short_reason(err: BaseException, limit: int = 120) -> str:
    """`err`'s type and the first line (first sentence) of its message, shortened to about `limit` chars."""
    lines = str(err).strip().splitlines()
    text = lines[0].split(". ")[0].rstrip(".") if lines else ""
    text = text if len(text) <= limit else text[: limit - 3].rstrip() + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def file_head(path: Path) -> bytes:
    """The file's first bytes (as many as `ZIP_MAGIC`); an unreadable file is a `CheckpointError`."""
    try:
        with path.open("rb") as f:
            return f.read(len(ZIP_MAGIC))
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read file ({err.strerror or err})") from None


def listing(names: list[str], limit: int = 8) -> str:
    """`[a, b, ... (+3 more)]`: at most `limit` names of a list, and how many more there are."""
    shown = ", ".join(names[:limit])
    return f"[{shown}{f', ... (+{len(names) - limit} more)' if len(names) > limit else ''}]"


def saved_shape(value: Any) -> tuple[int, ...] | None:
    """The parameter shape a saved tensor loads into (`loadable_shape`); None for anything else a checkpoint
    may hold."""
    return loadable_shape(value.shape) if isinstance(value, torch.Tensor) else None


def state_mismatch(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, Any], *, extra_ok: bool = False
) -> str:
    """'' when `state` holds every tensor of `expected` in a shape that loads into it, and nothing else
    (unless `extra_ok`); otherwise what differs, e.g. `missing [a], wrong shape [b (3, 4) != (4, 3)]`."""
    missing = sorted(set(expected) - set(state))
    unexpected = [] if extra_ok else sorted(set(state) - set(expected))
    wrong = [
        f"{name} {shape} != {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in state and (shape := saved_shape(state[name])) != tuple(tensor.shape)
    ]
    found = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
    return ", ".join(f"{what} {listing(names)}" for what, names in found if names)


def check_float(state: Mapping[str, Any], source: Path | str) -> None:
    """`CheckpointError` naming `source` and the entries of `state` that are not floating-point tensors
    (integer or boolean weights would be cast silently on loading; anything else is no weight at all)."""
    bad = [
        f"{name} ({value.dtype})" if isinstance(value, torch.Tensor) else f"{name} ({type(value).__name__})"
        for name, value in state.items()
        if not (isinstance(value, torch.Tensor) and value.is_floating_point())
    ]
    if bad:
        raise CheckpointError(f"{source}: weights that are not floating-point tensors: {listing(bad)}")


def check_finite(state: Mapping[str, Any], source: Path | str) -> None:
    """`CheckpointError` naming `source` and the tensors of `state` holding NaN or infinite values (weights
    saved from a diverged training give NaN embeddings and similarities)."""
    bad = [
        name for name, value in state.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(value.isfinite().all())
    ]
    if bad:
        raise CheckpointError(f"{source}: NaN or infinite weights in {listing(bad)} (saved from a diverged "
                              "training?)")
