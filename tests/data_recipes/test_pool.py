"""The recipes' process pool: input read only a little ahead, results in order."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from data_recipes.pool import parallel_map
from tests.conftest import REPO_ROOT


def test_parallel_map_reads_its_input_only_a_little_ahead():
    taken = []

    def items():
        for i in range(5000):
            taken.append(i)
            yield -i

    results = parallel_map(abs, items(), workers=2, chunksize=4)
    assert [next(results) for _ in range(10)] == list(range(10))
    assert len(taken) <= 2 * 4 * 4 + 12  # the chunks in flight and those taken
    assert list(results) == list(range(10, 5000))


def _die_on_seven(i: int) -> int:
    if i == 7:
        os.kill(os.getpid(), signal.SIGKILL)  # as the system's out-of-memory killer ends a worker
    return i


def test_a_worker_that_dies_is_an_error_not_a_wait_for_ever():
    script = (
        "from data_recipes.pool import parallel_map\n"
        "from tests.data_recipes.test_pool import _die_on_seven\n"
        "print(list(parallel_map(_die_on_seven, range(100), workers=2, chunksize=4)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "data_recipes.pool.WorkerDied: a worker process died (killed by the system: out of memory? try fewer "
        "--workers)")
