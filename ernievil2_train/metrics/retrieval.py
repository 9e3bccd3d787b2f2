"""Chunked image-text retrieval metrics: the official row-paired protocol and the any-positive protocol.

Scores are float32 `text @ image.T`, computed one chunk of text rows at a time, so memory stays
O(chunk_size * num_images) whatever the pool size (beyond the `KEEP_SCORES_BYTES` of scores kept between
the two passes of `rank_positives` when they fit). A query's rank is the number of candidates whose score is
strictly greater than the score of its (best) correct candidate, so ties favour the correct item.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

KS = (1, 5, 10)
DEFAULT_CHUNK_SIZE = 4096
COMPARE_ROWS = 32
PARALLEL_COMPARE = 1 << 22  # scores per chunk from which the CPU compare passes use all threads
KEEP_SCORES_BYTES = 1 << 30  # all chunks' scores up to this size are kept between the two passes


def _device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _embeddings(name: str, value: Tensor | np.ndarray, device: torch.device) -> Tensor:
    emb = torch.as_tensor(value).detach().to(device=device, dtype=torch.float32)
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D [N, D] array, got shape {tuple(emb.shape)}")
    with _cpu_threads(device, 1):
        finite = bool(torch.isfinite(emb).all())
    if not finite:
        raise ValueError(f"{name} contains NaN or infinite values")
    return emb


@contextlib.contextmanager
def _cpu_threads(device: torch.device, threads: int):
    """Set torch's intra-op CPU threads for a block (no-op off CPU). The ranking runs its small,
    memory-bound ops on one thread and only the matmuls on all: with intra-op threads every op waits for
    all of them, which costs more than it gains at these sizes (up to 10x on a busy host)."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _full_float32():
    """Exact float32 matmuls (no TF32 / reduced-precision kernels) whatever the caller set globally."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _image_index(value: object, text: int) -> int:
    """`value` as an image index (an int, a numpy or 0-dim torch integer); ValueError naming `text` else."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise ValueError(f"text {text}: image index {value!r} is not an integer") from None


def positive_pairs(text_to_images: Sequence[Sequence[int]], num_images: int) -> tuple[Tensor, Tensor]:
    """Flatten the ground truth into unique (text index, image index) pairs sorted by text."""
    texts: list[int] = []
    images: list[int] = []
    for t, positives in enumerate(text_to_images):
        unique = sorted({_image_index(i, t) for i in positives})
        if not unique:
            raise ValueError(f"text {t} has no ground-truth image")
        if unique[0] < 0 or unique[-1] >= num_images:
            bad = unique[0] if unique[0] < 0 else unique[-1]
            raise ValueError(f"text {t} refers to image index {bad}, but there are {num_images} images")
        texts.extend([t] * len(unique))
        images.extend(unique)
    return torch.tensor(texts, dtype=torch.long), torch.tensor(images, dtype=torch.long)


def _compare(scores: Tensor, start: int, blocks: Sequence[int], best_text: Tensor, best_image: Tensor,
             text_rank: Tensor) -> Tensor:
    """Count, over the row blocks of one chunk of scores, the candidates that beat each text's best positive
    (written into `text_rank`) and each image's (returned). Cache-sized blocks: two cheap passes each."""
    image_count = torch.zeros(scores.shape[1], dtype=torch.int32, device=scores.device)
    for u in blocks:
        block = scores[u : u + COMPARE_ROWS]
        rows = slice(start + u, start + u + block.shape[0])
        text_rank[rows] = (block > best_text[rows, None]).sum(1, dtype=torch.int32)
        image_count += (block > best_image[None, :]).sum(0, dtype=torch.int32)
    return image_count


def check_chunk_size(chunk_size: int) -> None:
    """ValueError unless `chunk_size` (texts scored at a time) is a positive integer."""
    try:
        valid = not isinstance(chunk_size, bool) and operator.index(chunk_size) >= 1
    except TypeError:
        valid = False
    if not valid:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def rank_positives(
    text_emb: Tensor,
    image_emb: Tensor,
    pair_text: Tensor,
    pair_image: Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """0-based ranks of the best positive: per text over all images, per image over all texts.

    `pair_text` must be sorted. Images with no positive text get rank -1. A positive pair's score is read
    from the same matrix product it is compared in, as the official script does: a candidate equal to the
    correct one (the same image on several rows) then ties with it instead of beating it by a rounding
    step. The first pass over the chunks takes the positive scores; the second compares (with the chunks'
    scores kept from the first when all of them fit in `KEEP_SCORES_BYTES`, else computed again).
    """
    check_chunk_size(chunk_size)
    num_texts, num_images = text_emb.shape[0], image_emb.shape[0]
    device, threads = text_emb.device, torch.get_num_threads()
    image_t = image_emb.T

    def chunk_scores(start: int) -> Tensor:
        with _cpu_threads(device, threads), _full_float32():
            return text_emb[start : start + chunk_size] @ image_t

    with _cpu_threads(device, 1):
        pair_text, pair_image = pair_text.to(device), pair_image.to(device)
        starts = list(range(0, num_texts, chunk_size))
        bounds = torch.searchsorted(pair_text, torch.tensor([*starts, num_texts], device=device)).tolist()
        keep = num_texts * num_images * 4 <= KEEP_SCORES_BYTES
        kept: dict[int, Tensor] = {}
        pos_score = torch.empty(pair_text.numel(), device=device)
        for c, start in enumerate(starts):
            scores = chunk_scores(start)
            lo, hi = bounds[c], bounds[c + 1]
            pos_score[lo:hi] = scores[pair_text[lo:hi] - start, pair_image[lo:hi]]
            if keep:
                kept[c] = scores
        best_text = torch.full((num_texts,), -torch.inf, device=device)
        best_text.scatter_reduce_(0, pair_text, pos_score, "amax")
        best_image = torch.full((num_images,), -torch.inf, device=device)
        best_image.scatter_reduce_(0, pair_image, pos_score, "amax")

        text_rank = torch.empty(num_texts, dtype=torch.int32, device=device)
        image_rank = torch.zeros(num_images, dtype=torch.int32, device=device)
        workers = threads if device.type == "cpu" else 1
        with ThreadPoolExecutor(max(workers - 1, 1)) as helpers:
            for c, start in enumerate(starts):
                scores = kept.pop(c) if keep else chunk_scores(start)
                row_blocks = list(range(0, scores.shape[0], COMPARE_ROWS))
                # Large CPU chunks: one slice of row blocks per thread (this one and helpers), one-thread ops.
                parallel = scores.numel() >= PARALLEL_COMPARE
                parts = np.array_split(row_blocks, workers) if parallel else [row_blocks]
                compare = functools.partial(
                    _compare, scores, start, best_text=best_text, best_image=best_image, text_rank=text_rank
                )
                helped = [helpers.submit(compare, part) for part in parts[1:]]
                image_rank += compare(parts[0])
                for counts in helped:
                    image_rank += counts.result()
        image_rank[torch.isinf(best_image)] = -1
        return text_rank.long(), image_rank.long()


def summarize(rank: Tensor | np.ndarray, prefix: str) -> dict[str, float]:
    """R@1/5/10, their mean, MRR and the 1-based median rank from 0-based ranks (as the official script)."""
    ranks = np.asarray(torch.as_tensor(rank).cpu().numpy(), dtype=np.int64)
    recalls = [float(np.mean(ranks < k)) for k in KS]
    out = {f"{prefix}/r@{k}": r for k, r in zip(KS, recalls, strict=True)}
    out[f"{prefix}/mean_recall"] = (recalls[0] + recalls[1] + recalls[2]) / 3
    out[f"{prefix}/mrr"] = float(np.mean(1.0 / (1 + ranks)))
    out[f"{prefix}/median_rank"] = float(np.median(ranks + 1))
    return out


def _metrics(text_rank: Tensor, image_rank: Tensor) -> dict[str, float]:
    out = summarize(text_rank, "t2i")
    out.update(summarize(image_rank[image_rank >= 0], "i2t"))
    out["mean_recall"] = (out["t2i/mean_recall"] + out["i2t/mean_recall"]) / 2
    return out


def ernie_protocol(
    text_emb: Tensor | np.ndarray,
    image_emb: Tensor | np.ndarray,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Official `eval_retri.py` semantics: text i pairs with image i, no normalization, any row count."""
    dev = _device(device)
    text = _embeddings("text embeddings", text_emb, dev)
    image = _embeddings("image embeddings", image_emb, dev)
    if text.shape != image.shape:
        raise ValueError(f"row-paired embeddings must have equal shapes, got {tuple(text.shape)} (text) and "
                         f"{tuple(image.shape)} (image)")
    diag = torch.arange(text.shape[0], device=dev)
    return _metrics(*rank_positives(text, image, diag, diag, chunk_size))


def any_positive(
    text_emb: Tensor | np.ndarray,
    image_emb: Tensor | np.ndarray,
    text_to_images: Sequence[Sequence[int]],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Unique texts and images, many-to-many ground truth; a query hits at K if any positive is in its top K.

    I2T is computed over the images that have at least one text.
    """
    dev = _device(device)
    text = _embeddings("text embeddings", text_emb, dev)
    image = _embeddings("image embeddings", image_emb, dev)
    if text.shape[1] != image.shape[1]:
        raise ValueError(f"embedding dimensions differ: text {text.shape[1]}, image {image.shape[1]}")
    if len(text_to_images) != text.shape[0]:
        raise ValueError(f"ground truth covers {len(text_to_images)} texts, but there are {text.shape[0]}")
    pair_text, pair_image = positive_pairs(text_to_images, image.shape[0])
    return _metrics(*rank_positives(text, image, pair_text, pair_image, chunk_size))
