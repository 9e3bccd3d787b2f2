"""Measurement helpers for the benchmarks: matmul ceiling, flop counting, step timing, peak memory, and a
counter of the operations that make the host wait for the device."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten
# Ops that read device values on the host: their result (a Python number, or an output shape that depends
# on the data) is only known once the device has caught up.
_SYNC_OPS = {
    aten._local_scalar_dense,  # .item(), bool(t), int(t), float(t), t.tolist() on scalars
    aten.nonzero,
    aten.masked_select,
    aten.equal,
    aten._unique2,
    aten.unique_consecutive,
    aten.unique_dim,
    aten.repeat_interleave,
    aten.lift_fresh,  # torch.tensor(data, device=...): a blocking copy from host memory to the device
}
_BOOL_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_}  # x[mask], x[mask] = v


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling_tflops(
    device: torch.device,
    size: int = 8192,
    dtype: torch.dtype = torch.bfloat16,
    repeats: int = 10,
    rounds: int = 5,
) -> float:
    """Best measured TFLOP/s of `size`³ matrix products on random data (the device's practical ceiling)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    best = 0.0
    for _ in range(rounds):
        seconds = time_region(lambda: [torch.mm(a, b, out=out) for _ in range(repeats)], device)
        best = max(best, 2 * size**3 * repeats / seconds / 1e12)
    return best


def time_region(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds `fn` takes on the device (CUDA events on GPU, a host clock after synchronising on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def time_steps(step: Callable[[int], object], steps: int, device: torch.device) -> list[float]:
    """Seconds per call of `step(i)` for `steps` calls, without host syncs between the calls on GPU.

    On CUDA one event is recorded before each step and one after the last, all on the current stream, so
    consecutive steps queue back to back as in training; each step's time is the gap between its events.
    """
    if device.type != "cuda":
        times = []
        for i in range(steps):
            begin = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - begin)
        return times
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    synchronize(device)
    for i in range(steps):
        events[i].record()
        step(i)
    events[-1].record()
    events[-1].synchronize()
    return [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(steps)]


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call of `fn` (matmul, conv, attention; forward + backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def count_host_syncs(fn: Callable[[], object]) -> dict[str, int]:
    """Host-sync ops of one call of `fn`, by op name (see `HostSyncCounter`)."""
    with HostSyncCounter() as counter:
        fn()
    return dict(counter.ops)


def reset_peak_memory(device: torch.device) -> None:
    """Free cached blocks and restart the peak-allocation counter (no-op on CPU)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak bytes allocated by tensors since the last reset, None on CPU (not tracked)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


class HostSyncCounter(TorchDispatchMode):
    """Counts, by op name, the operations run inside it that wait for the device on CUDA: reading a value
    (`.item()`, `bool(t)`, `int(t)`), data-dependent shapes (`nonzero`, boolean-mask indexing,
    `masked_select`, `unique`, `repeat_interleave`), `torch.equal`, and `torch.tensor(data)` (a blocking copy
    from host memory when the target is a GPU; `lift_fresh`). Works on any device, so a CPU run shows which
    syncs a GPU run of the same code would have. Other copies between host and device (`.cpu()`, `.to()`) are
    not counted: on CPU they cannot be told apart from copies that stay on one device.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        packet = func.overloadpacket
        if packet in _SYNC_OPS or (packet in _BOOL_INDEX_OPS and _has_bool_index(args[1])):
            self.ops[str(packet)] += 1
        return func(*args, **(kwargs or {}))


def _has_bool_index(indices: Any) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
