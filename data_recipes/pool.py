"""A parallel map over a process pool that stops cleanly: Ctrl-C and SIGTERM are for the parent, which
stops its workers itself, and the pool never waits for a worker a signal ended."""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, when the first that came takes effect, so that neither
    stops the block half-way; processes forked in the block start with both blocked."""
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    if threading.current_thread() is not threading.main_thread() or None in previous.values():
        yield  # handlers can be set in the main thread only, and not put back when set outside Python
        return
    came: list[int] = []
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda n, _: came.append(n))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if came:
            signal.raise_signal(came[0])


_stopping: Any = None  # in a pool worker: the flag by which `parallel_map` tells it to skip the work left


def _start_worker(stopping: Any) -> None:
    """A pool worker's initializer. Ctrl-C and SIGTERM are for the parent: a worker that a signal ended could
    die holding a queue lock, and the pool would then wait for it forever."""
    global _stopping
    _stopping = stopping
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _map_chunk(fn: Callable[[Any], Any], chunk: list[Any]) -> list[Any]:
    return [fn(item) for item in chunk if not _stopping.value]


class WorkerDied(RuntimeError):
    """A pool worker ended without handing its results back (killed: out of memory, say, or a crash in
    native code)."""


@contextlib.contextmanager
def _worker_deaths() -> Iterator[None]:
    """Turn the broken pool a dead worker leaves (told by a submission or a result) into `WorkerDied`."""
    try:
        yield
    except BrokenProcessPool:
        raise WorkerDied(
            "a worker process died (killed by the system: out of memory? try fewer --workers)") from None


def parallel_map(
    fn: Callable[[Any], Any], items: Iterable[Any], workers: int, chunksize: int = 8, ahead: int = 4
) -> Iterator[Any]:
    """`map(fn, items)` in order, over a process pool when `workers > 1` (fn must be picklable).

    At most `ahead` chunks of `chunksize` items per worker are in flight, so `items` is read only a little
    ahead of the results taken (a large input is never pulled into memory at once). When the caller stops
    early (an error, Ctrl-C), the workers finish the item at hand, skip the rest and exit. A worker that dies
    is `WorkerDied`, not a wait for results that never come.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    items = iter(items)
    pending: deque[Future] = deque()
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    stopping = context.RawValue("b", 0)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(stopping,))
    try:
        while True:
            chunk = list(itertools.islice(items, chunksize))
            with _worker_deaths():
                if chunk:
                    # the first submission starts the workers, both signals blocked until they ignore them
                    with signals_held() if not pending else contextlib.nullcontext():
                        pending.append(pool.submit(_map_chunk, fn, chunk))
                results = []
                if pending and (not chunk or len(pending) >= workers * ahead):
                    results = pending.popleft().result()
            yield from results
            if not chunk and not pending:
                return
    finally:
        stopping.value = 1
        with signals_held():
            pool.shutdown(wait=True, cancel_futures=True)
