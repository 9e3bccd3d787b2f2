"""Retrieval metric core vs brute-force dense references and the official fixture numbers."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from ernievil2_train.metrics.retrieval import any_positive, ernie_protocol


def quantised(rng: np.random.Generator, n: int, d: int = 6) -> np.ndarray:
    """Multiples of 1/4 in [-1, 1]: every dot product is exact in float32, so ties are real ties."""
    return (rng.integers(-4, 5, size=(n, d)) / 4).astype(np.float32)


def summary(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    r = [float(np.mean(ranks < k)) for k in (1, 5, 10)]
    return {
        f"{prefix}/r@1": r[0], f"{prefix}/r@5": r[1], f"{prefix}/r@10": r[2],
        f"{prefix}/mean_recall": (r[0] + r[1] + r[2]) / 3,
        f"{prefix}/mrr": float(np.mean(1.0 / (1 + ranks))),
        f"{prefix}/median_rank": float(np.median(ranks + 1)),
    }


def dense_reference(text: np.ndarray, image: np.ndarray, text_to_images: list[list[int]]) -> dict[str, float]:
    """Brute force: full float32 score matrix, best positive, strict-greater counts."""
    scores = text @ image.T
    t_ranks = np.array([(scores[t] > scores[t, pos].max()).sum() for t, pos in enumerate(text_to_images)])
    i_ranks = []
    for j in range(image.shape[0]):
        texts = [t for t, pos in enumerate(text_to_images) if j in pos]
        if texts:
            i_ranks.append((scores[:, j] > scores[texts, j].max()).sum())
    out = summary(t_ranks, "t2i") | summary(np.array(i_ranks), "i2t")
    out["mean_recall"] = (out["t2i/mean_recall"] + out["i2t/mean_recall"]) / 2
    return out


@pytest.mark.parametrize("n", [1, 9, 37, 203])
def test_ernie_protocol_matches_dense_reference_with_ties(n):
    rng = np.random.default_rng(n)
    text, image = quantised(rng, n), quantised(rng, n)
    image[::3] = text[::3]  # some exact matches, many tied competitors
    expected = dense_reference(text, image, [[i] for i in range(n)])
    assert ernie_protocol(text, image, chunk_size=16, device="cpu") == expected


def test_parallel_compare_passes_give_the_same_numbers(monkeypatch):
    """Large chunks split their compare passes over threads; force that on a small, tie-heavy case."""
    from ernievil2_train.metrics import retrieval

    rng = np.random.default_rng(5)
    text, image = quantised(rng, 150), quantised(rng, 150)
    image[::3] = text[::3]
    positives = many_to_many(rng, 150, 150)
    expected = (dense_reference(text, image, [[i] for i in range(150)]),
                dense_reference(text, image, positives))
    monkeypatch.setattr(retrieval, "PARALLEL_COMPARE", 0)
    monkeypatch.setattr(retrieval, "COMPARE_ROWS", 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        got = (ernie_protocol(text, image, chunk_size=64, device="cpu"),
               any_positive(text, image, positives, chunk_size=64, device="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert got == expected


@pytest.mark.parametrize("keep_scores", [True, False])
@pytest.mark.parametrize("dim", [16, 48, 768])
def test_an_image_on_several_rows_ties_with_itself(monkeypatch, keep_scores, dim):
    """The official eval file repeats an image on the row of each of its captions. Real-valued embeddings
    (not exact in float32): a repeat of the correct image must tie with it, as in the official single
    matrix product, not beat it by a rounding step of a separately computed dot product."""
    from ernievil2_train.metrics import retrieval

    if not keep_scores:
        monkeypatch.setattr(retrieval, "KEEP_SCORES_BYTES", 0)  # the second pass computes the scores again
    rng = np.random.default_rng(dim)
    unique = rng.standard_normal((12, dim)).astype(np.float32)
    unique /= np.linalg.norm(unique, axis=1, keepdims=True)
    image = np.repeat(unique, 5, axis=0)  # 5 captions per image, one row each
    text = image + 0.1 * rng.standard_normal(image.shape).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    expected = dense_reference(text, image, [[i] for i in range(len(text))])
    assert ernie_protocol(text, image, chunk_size=16, device="cpu") == expected
    assert expected["t2i/r@1"] > 0.9  # the repeats tie with the correct image instead of outranking it


def test_ties_favour_the_correct_item():
    text = np.ones((4, 3), np.float32)
    image = np.ones((4, 3), np.float32)
    m = ernie_protocol(text, image, device="cpu")
    assert m["t2i/r@1"] == m["i2t/r@1"] == 1.0 and m["t2i/median_rank"] == 1.0


def test_scores_are_float32_products_as_the_official_scripts_are():
    """Image 1 beats text 0's correct image 0 by 2**-30, below float32's resolution near 1: in float32
    scores (the official evaluator's) they tie, and ties favour the correct image; float64 would not tie."""
    text = np.array([[1.0, 2.0**-30], [0.0, 1.0]], np.float32)
    image = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)
    assert float(text[0, 1]) == 2.0**-30 and (text.astype(np.float64) @ image.T.astype(np.float64))[0, 1] > 1
    assert ernie_protocol(text, image, device="cpu")["t2i/r@1"] == 1.0
    assert any_positive(text, image, [[0], [1]], device="cpu")["t2i/r@1"] == 1.0


@pytest.mark.parametrize("chunk_size", [1, 3, 50, 4096])
def test_chunk_size_does_not_change_results(chunk_size):
    rng = np.random.default_rng(7)
    text = rng.standard_normal((61, 16)).astype(np.float32)
    image = text + rng.standard_normal((61, 16)).astype(np.float32)
    positives = [[i, (i * 7) % 61] for i in range(61)]
    base = (ernie_protocol(text, image, chunk_size=61, device="cpu"),
            any_positive(text, image, positives, chunk_size=61, device="cpu"))
    got = (ernie_protocol(text, image, chunk_size=chunk_size, device="cpu"),
           any_positive(text, image, positives, chunk_size=chunk_size, device="cpu"))
    assert got == base


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, True, "64"])
def test_a_chunk_size_below_one_or_not_an_integer_is_refused(chunk_size):
    """A negative one scored no chunk at all and read ranks from uninitialised memory."""
    text = np.eye(4, dtype=np.float32)
    message = f"chunk_size must be a positive integer, got {chunk_size!r}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ernie_protocol(text, text, chunk_size=chunk_size, device="cpu")
    with pytest.raises(ValueError, match=r"^chunk_size must be a positive integer"):
        any_positive(text, text, [[0], [1], [2], [3]], chunk_size=chunk_size, device="cpu")
    assert ernie_protocol(text, text, chunk_size=np.int64(3), device="cpu")["t2i/r@1"] == 1.0


def many_to_many(rng: np.random.Generator, num_texts: int, num_images: int) -> list[list[int]]:
    """Texts with one to three images (duplicates inside a list too), several texts per image."""
    out = []
    for _ in range(num_texts):
        k = int(rng.integers(1, 4))
        pos = rng.integers(0, num_images, size=k).tolist()
        out.append(pos + pos[:1])
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_positive_matches_dense_reference(seed):
    rng = np.random.default_rng(seed)
    num_texts, num_images = 83, 29  # some images without texts
    text, image = quantised(rng, num_texts), quantised(rng, num_images)
    gt = many_to_many(rng, num_texts, num_images)
    expected = dense_reference(text, image, [sorted(set(p)) for p in gt])
    assert any_positive(text, image, gt, chunk_size=10, device="cpu") == expected


def test_any_positive_with_one_to_one_ground_truth_equals_ernie_protocol():
    rng = np.random.default_rng(3)
    text, image = quantised(rng, 40), quantised(rng, 40)
    assert any_positive(text, image, [[i] for i in range(40)], device="cpu") == ernie_protocol(
        text, image, device="cpu")


def test_hit_when_any_positive_is_in_top_k():
    text = np.array([[1.0, 0.0]], np.float32)
    image = np.array([[0.9, 0.0], [0.5, 0.0], [1.0, 0.0], [0.1, 0.0]], np.float32)
    m = any_positive(text, image, [[1, 3]], device="cpu")  # best positive is image 1, one image above it
    assert m["t2i/r@1"] == 0.0 and m["t2i/r@5"] == 1.0 and m["t2i/median_rank"] == 3.0


def test_matches_official_numbers(paddle_ref):
    for case in json.loads((paddle_ref / "eval_cases.json").read_text()):
        rows = [line.split("\t") for line in (paddle_ref / case["file"]).read_text().splitlines()]
        text = np.array([[float(x) for x in r[0].split(" ")] for r in rows], dtype=np.float32)
        image = np.array([[float(x) for x in r[1].split(" ")] for r in rows], dtype=np.float32)
        m = ernie_protocol(text, image, chunk_size=7, device="cpu")
        for direction in ("t2i", "i2t"):
            keys = ["r@1", "r@5", "r@10", "mean_recall", "mrr"]
            assert [m[f"{direction}/{k}"] for k in keys] == case[direction], (case["file"], direction)
        assert m["mean_recall"] == case["mean"][3]


@pytest.mark.parametrize(
    ("text", "image", "gt", "match"),
    [
        (np.full((2, 3), np.nan, np.float32), np.ones((2, 3), np.float32), [[0], [1]], "NaN"),
        (np.ones((2, 3), np.float32), np.ones((2, 4), np.float32), [[0], [1]], "dimensions"),
        (np.ones((2, 3), np.float32), np.ones((2, 3), np.float32), [[0], []], "no ground-truth"),
        (np.ones((2, 3), np.float32), np.ones((2, 3), np.float32), [[0], [2]], "image index 2"),
        (np.ones((2, 3), np.float32), np.ones((2, 3), np.float32), [[0]], "covers 1 texts"),
        (np.ones((2, 3), np.float32), np.ones((2, 3), np.float32), [[0.5], [1]], r"text 0: image index 0\.5"),
        (np.ones((2, 3), np.float32), np.ones((2, 3), np.float32), [[0], [True]], "text 1: image index True"),
        (np.ones((2, 3), np.float32), np.ones((2, 3), np.float32), [[0], ["1"]], "text 1: image index '1'"),
        (np.ones((0, 3), np.float32), np.ones((2, 3), np.float32), [], "non-empty"),
    ],
)
def test_bad_inputs_raise(text, image, gt, match):
    with pytest.raises(ValueError, match=match):
        any_positive(text, image, gt, device="cpu")


def test_ernie_protocol_needs_paired_rows():
    with pytest.raises(ValueError, match="equal shapes"):
        ernie_protocol(np.ones((3, 2), np.float32), np.ones((4, 2), np.float32), device="cpu")


class MatmulPrecisionLog(TorchFunctionMode):
    """Records `torch.get_float32_matmul_precision()` at every matrix product run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in {"matmul", "__matmul__", "mm", "addmm", "bmm"}:
            self.seen.append(torch.get_float32_matmul_precision())
        return func(*args, **(kwargs or {}))


def test_scores_stay_full_float32_under_reduced_matmul_precision():
    """A caller's "medium" (TF32 / bf16 kernels) becomes "highest" for the score products, then comes back."""
    rng = np.random.default_rng(8)
    text = rng.standard_normal((30, 64)).astype(np.float32)
    image = (text + rng.standard_normal((30, 64))).astype(np.float32)
    expected = dense_reference(text, image, [[i] for i in range(30)])
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        with MatmulPrecisionLog() as log:
            got = ernie_protocol(text, image, chunk_size=8, device="cpu")
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert log.seen and set(log.seen) == {"highest"}, log.seen
    assert got == expected
