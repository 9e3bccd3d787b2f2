"""Retrieval evaluation speed: our evaluator vs the official `eval_retri.py` method, on the same files.

For each size n, a `run_infer`-format embeddings file (d=768, L2-normalised, float32 `str()` values) is
generated once (seeded, cached in --workdir). Three contenders:

* official: the published method, re-implemented here from its description: `float()` parsing line by line,
  a dense float32 score matrix from numpy matmuls over 10 row chunks, ranks by chunked strict-greater
  comparison in numpy (I2T on the transposed matrix);
* ours: `read_embeddings_file` + `ernie_protocol` (vectorised parser, fused chunked ranking, no n x n);
* floor: one bare float32 `text @ image.T` of the same shape (torch), the cost of the scores alone.

Prints parse / score+rank / total seconds (best of --repeats) with ratios, and checks that both evaluators
report identical R@1/5/10, mean recall and MRR. `--big` also runs a 100k x 100k evaluation (both protocols)
on random embeddings in a child process and reports its time and peak RSS.

    python bench/retrieval.py [--sizes 1000 5000 10000] [--repeats 2] [--big [--big-n 100000 --big-dim 256]]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ernievil2_train.metrics.files import read_embeddings_file
from ernievil2_train.metrics.retrieval import any_positive, ernie_protocol

KEYS = ("r@1", "r@5", "r@10", "mean_recall", "mrr")


def write_file(path: Path, n: int, dim: int, seed: int = 0) -> Path:
    """Text vectors and noisy image copies, normalised, written as `run_infer` does (str of float32)."""
    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    text = rng.standard_normal((n, dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    image = (text + 1.2 * rng.standard_normal((n, dim)) / np.sqrt(dim)).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    tmp = path.with_suffix(".partial")
    with tmp.open("w") as fh:
        for t, i in zip(text, image, strict=True):
            fh.write(" ".join(map(str, t)) + "\t" + " ".join(map(str, i)) + "\t1\n")
    tmp.rename(path)
    return path


def official_parse(path: Path) -> tuple[np.ndarray, np.ndarray]:
    texts, images = [], []
    with path.open() as fh:
        for line in fh:
            fields = line.strip().split("\t")
            texts.append([float(x) for x in fields[0].split(" ")])
            images.append([float(x) for x in fields[1].split(" ")])
    return np.array(texts, dtype=np.float32), np.array(images, dtype=np.float32)


def official_scores(text: np.ndarray, image: np.ndarray, chunks: int = 10) -> np.ndarray:
    step = text.shape[0] // chunks
    return np.concatenate([text[i * step : (i + 1) * step] @ image.T for i in range(chunks)])


def official_ranks(scores: np.ndarray, chunks: int = 10) -> np.ndarray:
    n, step = scores.shape[0], scores.shape[0] // chunks
    ranks = []
    for c in range(chunks):
        rows = scores[c * step : (c + 1) * step]
        correct = rows[np.arange(rows.shape[0]), np.arange(c * step, c * step + rows.shape[0])]
        ranks.append((rows > correct[:, None]).sum(axis=1))
    assert sum(r.size for r in ranks) == n
    return np.concatenate(ranks)


def official_summary(ranks: np.ndarray) -> list[float]:
    r1, r5, r10 = (float(np.mean(ranks < k)) for k in (1, 5, 10))
    return [r1, r5, r10, (r1 + r5 + r10) / 3, float(np.mean(1.0 / (1 + ranks)))]


class Clock:
    """Wall and process-CPU seconds of consecutive phases."""

    def __init__(self) -> None:
        self.marks = [(time.perf_counter(), time.process_time())]

    def lap(self) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))

    def phases(self) -> list[tuple[float, float]]:
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(self.marks, self.marks[1:], strict=False)]


def run_official(path: Path) -> tuple[dict[str, list[float]], list[tuple[float, float]]]:
    clock = Clock()
    text, image = official_parse(path)
    clock.lap()
    scores = official_scores(text, image)
    result = {"t2i": official_summary(official_ranks(scores)),
              "i2t": official_summary(official_ranks(scores.T))}
    clock.lap()
    return result, clock.phases()


def run_ours(path: Path) -> tuple[dict[str, list[float]], list[tuple[float, float]]]:
    clock = Clock()
    text, image = read_embeddings_file(path)
    clock.lap()
    m = ernie_protocol(text, image, device="cpu")
    clock.lap()
    return {d: [m[f"{d}/{k}"] for k in KEYS] for d in ("t2i", "i2t")}, clock.phases()


def bare_matmul(n: int, dim: int) -> tuple[float, float]:
    a, b = torch.randn(n, dim), torch.randn(n, dim)
    clock = Clock()
    _ = a @ b.T
    clock.lap()
    return clock.phases()[0]


def compare(sizes: list[int], dim: int, repeats: int, workdir: Path) -> bool:
    """Time both evaluators at each size; True when they reported the same numbers at every size."""
    print(f"torch threads {torch.get_num_threads()}; best of {repeats} (runs interleaved); seconds")
    head = (f"{'n':>6} {'clock':>5} | {'official parse':>14} {'score+rank':>10} {'total':>7} | "
            f"{'ours parse':>10} {'score+rank':>10} {'total':>7} | {'matmul':>7} | "
            f"{'e2e x':>6} {'parse x':>7} {'rank/matmul':>11} | same")
    print(head)
    print("-" * len(head))
    agreed = True
    for n in sizes:
        path = write_file(workdir / f"emb_n{n}_d{dim}.txt", n, dim)
        official, ours, floors = [], [], []
        for _ in range(repeats):
            official.append(run_official(path))
            ours.append(run_ours(path))
            floors.append(bare_matmul(n, dim))
        same = all(r[0] == official[0][0] for r in official + ours)
        for c, clock in enumerate(("wall", "cpu")):
            op, orank = (min(r[1][i][c] for r in official) for i in range(2))
            up, urank = (min(r[1][i][c] for r in ours) for i in range(2))
            floor = min(f[c] for f in floors)
            print(f"{n:>6} {clock:>5} | {op:>14.3f} {orank:>10.3f} {op + orank:>7.3f} | {up:>10.3f} "
                  f"{urank:>10.3f} {up + urank:>7.3f} | {floor:>7.3f} | {(op + orank) / (up + urank):>6.2f} "
                  f"{op / up:>7.2f} {urank / floor:>11.2f} | {'yes' if same else 'NO'}")
        if not same:
            print("   official:", official[0][0], "\n   ours:    ", ours[0][0])
            agreed = False
    return agreed


def _big_child(n: int, dim: int, out: mp.Queue) -> None:
    rng = torch.Generator().manual_seed(0)
    text = torch.randn(n, dim, generator=rng)
    image = text + torch.randn(n, dim, generator=rng)
    t0 = time.perf_counter()
    ernie = ernie_protocol(text, image, device="cpu")
    t1 = time.perf_counter()
    per_image = 5  # n texts, n / 5 images, each text with its image and a second random one
    images = image[::per_image].contiguous()
    extra = torch.randint(0, images.shape[0], (n,), generator=rng).tolist()
    gt = [[t // per_image, j] for t, j in enumerate(extra)]
    t2 = time.perf_counter()
    anyp = any_positive(text, images, gt, device="cpu")
    t3 = time.perf_counter()
    out.put((t1 - t0, ernie["mean_recall"], t3 - t2, anyp["mean_recall"], images.shape[0]))


def big(n: int, dim: int) -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_big_child, args=(n, dim, queue))
    proc.start()
    ernie_s, ernie_mr, any_s, any_mr, num_images = queue.get()
    proc.join()
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    dense_gib = n * n * 4 / 2**30
    print(f"\nbig: {n} x {n} ernie protocol, d={dim}: {ernie_s:.1f} s (mean recall {ernie_mr:.4f})")
    print(f"big: {n} texts x {num_images} images any_positive, d={dim}: {any_s:.1f} s "
          f"(mean recall {any_mr:.4f})")
    print(f"big: peak RSS {peak_gib:.2f} GiB (a dense {n}x{n} float32 score matrix is {dense_gib:.1f} GiB)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000], help="rows; multiples of 10")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ernievil2_bench_retrieval")
    p.add_argument("--big", action="store_true", help="also run the 100k x 100k memory-bounded evaluation")
    p.add_argument("--big-n", type=int, default=100_000)
    p.add_argument("--big-dim", type=int, default=256)
    args = p.parse_args(argv)
    if any(n % 10 for n in args.sizes):
        p.error("--sizes must be multiples of 10 (the official method splits the rows into 10 chunks)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    agreed = compare(args.sizes, args.dim, args.repeats, args.workdir)
    if args.big:
        big(args.big_n, args.big_dim)
    return 0 if agreed else 1


if __name__ == "__main__":
    raise SystemExit(main())
