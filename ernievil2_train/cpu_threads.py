"""How many threads a training process on CPU computes with: the cores its loader workers leave it.

Torch starts one compute thread per core; beside busy loader workers (one thread each) they oversubscribe the
cores, and torch's threads, which spin while they wait, then slow each step down several times (measured on 2
busy cores: a one-epoch demo run of 1,024 samples took 22 to 46 s with the default, 13 to 14 s with one).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import lightning.pytorch as pl
import torch
from lightning.pytorch.accelerators import CPUAccelerator

log = logging.getLogger(__name__)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, as a SLURM job or `taskset` limits it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextlib.contextmanager
def cores_shared(trainer: pl.Trainer, loader_workers: int) -> Iterator[int | None]:
    """On a CPU trainer, let each training process compute with the cores per process less its loader
    workers (at least one) inside the block, and yield that count; an `OMP_NUM_THREADS` the user set wins
    (None: nothing changed). With several processes the variable carries the count to the ones the trainer
    launches. The earlier count (and variable) come back after the block."""
    if not isinstance(trainer.accelerator, CPUAccelerator) or "OMP_NUM_THREADS" in os.environ:
        yield None
        return
    processes = max(1, trainer.num_devices)
    cores = available_cores()
    threads = max(1, cores // processes - max(0, loader_workers))
    log.info("training on CPU with %d compute thread(s) per process (%d cores, %d process(es), %d loader "
             "worker(s) each; OMP_NUM_THREADS sets another count)", threads, cores, processes, loader_workers)
    earlier = torch.get_num_threads()
    torch.set_num_threads(threads)
    if processes > 1:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(earlier)
        if processes > 1:
            os.environ.pop("OMP_NUM_THREADS", None)
