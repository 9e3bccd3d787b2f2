"""The `--device` option of the command-line tools."""

from __future__ import annotations

import torch


def resolve_device(name: str | None) -> torch.device:
    """--device as a torch device that exists here (None or `auto`: cuda if available, else cpu); ValueError
    naming --device otherwise."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device (use cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"--device {name!r}: not a compute device (use cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested but no CUDA device is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError):
        raise ValueError(f"--device {name}: not available on this machine") from None
    return device
