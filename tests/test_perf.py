"""The measurement helpers: flop counts, host-sync counting, step timing, and what they report on CPU."""

from __future__ import annotations

import torch

from ernievil2_train import perf

CPU = torch.device("cpu")


def test_flops_count_forward_and_backward_of_a_matmul() -> None:
    a = torch.randn(8, 16, requires_grad=True)
    b = torch.randn(16, 4)
    assert perf.count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    assert perf.count_flops(lambda: (a @ b).sum().backward()) == 2 * (2 * 8 * 16 * 4)  # + the grad of `a`


def test_every_kind_of_host_sync_is_counted_by_op() -> None:
    x = torch.arange(6.0)
    mask = x > 2

    def step() -> None:
        float(x.sum())  # a value read on the host
        x.nonzero()  # a data-dependent shape
        x[mask] = x[mask] * 2  # boolean-mask indexing, read and written
        torch.tensor([1.0, 2.0])

    counted = perf.count_host_syncs(step)
    assert counted == {
        "aten._local_scalar_dense": 1, "aten.index": 1, "aten.nonzero": 1, "aten.index_put_": 1,
        "aten.lift_fresh": 1,
    }


def test_device_side_work_is_not_a_host_sync() -> None:
    x = torch.randn(4, 4)
    index = torch.tensor([0, 2])

    def step() -> None:
        x[index]  # integer indexing: the shape is known without reading values
        x.masked_fill_(x > 0, 0.0)  # no shape that depends on the data
        x[:, 0].fill_(1.0)  # a fill of a view (assigning a Python number copies a new tensor from the host)
        torch.where(x > 0, x, 0.0).softmax(-1).sum()

    assert perf.count_host_syncs(lambda: step()) == {}


def test_steps_are_timed_one_by_one_and_cpu_memory_is_not_tracked() -> None:
    calls: list[int] = []
    times = perf.time_steps(calls.append, 3, CPU)
    assert calls == [0, 1, 2] and len(times) == 3 and all(t >= 0 for t in times)
    assert perf.time_region(lambda: None, CPU) >= 0
    perf.reset_peak_memory(CPU)
    assert perf.peak_memory_bytes(CPU) is None
