"""Whether a model's weights fit in the memory this machine has free, told before any is taken."""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from ernievil2_train.models.dual_encoder import DualEncoder, DualEncoderConfig

MEMINFO = Path("/proc/meminfo")
GIB = 2**30


def available_memory() -> int | None:
    """Bytes of memory a new allocation can take (Linux `MemAvailable`, else free pages); None if unknown."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of `model` (a meta-device model counts as its real one would)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _sizes(config: DualEncoderConfig) -> str:
    """`vision.image_size=224, vision.patch_size=16, ...`: the integer sizes of both towers."""
    return ", ".join(
        f"{tower}.{name}={value}"
        for tower in ("vision", "text")
        for name, value in asdict(getattr(config, tower)).items()
        if isinstance(value, int)
    )


def _shell_bytes(config: DualEncoderConfig, vision_layers: int, text_layers: int) -> int:
    shallow = replace(
        config,
        vision=replace(config.vision, layers=vision_layers),
        text=replace(config.text, layers=text_layers),
    )
    with torch.device("meta"):
        return weight_bytes(DualEncoder(shallow))


def model_bytes(config: DualEncoderConfig) -> int:
    """Bytes of the weights of a model of `config`, counted on meta-device models of one and two layers per
    tower (the weights grow by the same amount with each layer), so that no depth takes long to count."""
    base = _shell_bytes(config, 1, 1)
    per_vision_layer = _shell_bytes(config, 2, 1) - base
    per_text_layer = _shell_bytes(config, 1, 2) - base
    return base + (config.vision.layers - 1) * per_vision_layer + (config.text.layers - 1) * per_text_layer


def check_fits_in_memory(config: DualEncoderConfig, needed: int | None = None) -> None:
    """ValueError when the weights of a model of `config` (`needed` bytes, when already counted) need more
    memory than is available: sizes set far too large (a mistyped image size, say) are refused at once
    rather than by the allocator's traceback or the kernel's out-of-memory kill."""
    needed, available = model_bytes(config) if needed is None else needed, available_memory()
    if available is not None and needed > available:
        raise ValueError(
            f"the model's weights need {needed / GIB:,.1f} GiB, more than the {available / GIB:,.1f} GiB of "
            f"memory available: check its sizes ({_sizes(config)})"
        )
