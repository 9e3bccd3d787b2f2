"""The recipes' process pool: input read only a little ahead, results in order."""

from __future__ import annotations

from data_recipes.pool import parallel_map


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
