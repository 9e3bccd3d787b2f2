"""Spawning real gloo process groups for the DDP tests."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port nobody listens on now, for the process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Callable[..., None], world: int, args: tuple[Any, ...], timeout_s: float) -> None:
    """`worker(rank, world, port, *args)` in `world` spawned processes; the test fails (and the processes are
    killed) if they are not done within `timeout_s`, as when a rank waits on another forever."""
    context = mp.start_processes(worker, args=(world, free_port(), *args), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world} DDP processes did not finish within {timeout_s} s (a rank waiting?)")
