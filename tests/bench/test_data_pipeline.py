"""bench/data_pipeline.py on CPU at a tiny size: both loaders run to the end."""

from __future__ import annotations

from tests.bench.helpers import run_bench


def test_data_pipeline_runs_both_loaders() -> None:
    out = run_bench("data_pipeline.py", "--samples", "32", "--shards", "2", "--workers", "1",
                    "--batch-size", "8", "--image-size", "32")
    assert "smp/s" in out and out.rstrip().endswith("(per worker)"), out
