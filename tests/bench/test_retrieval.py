"""bench/retrieval.py on CPU at a tiny size: our evaluator and the official method agree."""

from __future__ import annotations

from pathlib import Path

from tests.bench.helpers import run_bench


def test_retrieval_evaluators_agree(tmp_path: Path) -> None:
    out = run_bench("retrieval.py", "--sizes", "100", "--repeats", "1", "--dim", "16",
                    "--workdir", str(tmp_path))
    rows = [line for line in out.splitlines() if line.lstrip().startswith("100 ")]
    assert len(rows) == 2 and all(row.endswith("| yes") for row in rows), out  # wall and cpu rows
