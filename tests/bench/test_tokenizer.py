"""bench/tokenizer.py --quick: the fast path and the reference agree on every caption."""

from __future__ import annotations

from tests.bench.helpers import run_bench


def test_tokenizer_fast_path_agrees_with_the_reference() -> None:
    out = run_bench("tokenizer.py", "--quick")
    assert "fast / ref" in out, out  # the benchmark exits non-zero when the two disagree
