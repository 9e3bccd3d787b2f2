"""Tokenizer throughput: the Rust fast path vs the pure-Python reference, on the same captions.

Generates realistic captions in-script (seeded): Chinese, English and mixed Chinese/English, with numbers,
brands, full-width punctuation and the odd emoji; about 1% contain a script outside the fast path's safe set
and take the reference route inside the fast tokenizer, as they would in real data. Both tokenizers run in
this one process; each is timed as batched calls (`tok(batch)`) and per-sample calls (`tok([text])`, as a data
worker does), best of `--repeats`. Rates use the process's CPU time (both run single-threaded), so that other
load on a shared machine does not skew the ratio.

    python bench/tokenizer.py [--quick] [--vocab vocab.txt] [--n 20000]
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

from ernievil2_train.text import ErnieTokenizer

DEFAULT_VOCAB = (
    Path(
        os.environ.get(
            "ERNIEVIL2_PADDLE_REF", Path(__file__).resolve().parents[2] / "shared/fixtures/paddle_ref"
        )
    )
    / "vocab.txt"
)

ZH_COUNT = ["一只", "两只", "一个", "几个", "一群", "三个", "一辆", "一张"]
ZH_ADJ = ["黑白相间的", "红色的", "可爱的", "年轻的", "高大的", "小小的", "穿着蓝色衬衫的", "戴着帽子的"]
ZH_NOUN = ["小猫", "狗", "男孩", "女孩", "老人", "汽车", "自行车", "桌子", "飞机", "火车", "蛋糕", "雨伞"]
ZH_VERB = ["趴在", "站在", "坐在", "走在", "停在", "躺在", "跑过", "放在"]
ZH_PLACE = ["木地板上", "草地上", "城市街道上", "海滩上", "厨房里", "公园里", "雪地里", "桌子旁边"]
ZH_TAIL = ["晒太阳。", "，天空中飘着白云。", "，旁边有很多人。", "。", "！", "，看起来很开心。", ""]
EN_ADJ = ["red", "small", "happy", "old", "wooden", "crowded", "snowy", "bright"]
EN_NOUN = ["cat", "dog", "man", "woman", "bicycle", "train", "pizza", "kitchen", "street", "frisbee"]
EN_VERB = ["sitting on", "riding", "standing next to", "playing with", "walking down", "looking at"]
BRANDS = ["iPhone 14 Pro", "T-shirt", "NBA", "Nike", "MacBook Air", "LED", "KTV", "3D", "Wi-Fi"]
EXTRAS = ["😀", "🐱", "（包邮）", "￥199.00", "2019年12月31日", "《书名》", "“引号”", "100%", "#hashtag"]
RARE = ["สวัสดี", "नमस्ते", "ሰላም", "ᠮᠣᠩᠭᠣᠯ"]


def make_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)

    def zh() -> str:
        return "".join(rng.choice(x) for x in (ZH_COUNT, ZH_ADJ, ZH_NOUN, ZH_VERB, ZH_PLACE, ZH_TAIL))

    def en() -> str:
        words = ["A", rng.choice(EN_ADJ), rng.choice(EN_NOUN), rng.choice(EN_VERB), "a", rng.choice(EN_NOUN)]
        if rng.random() < 0.5:
            words += ["in", "the", rng.choice(EN_ADJ), rng.choice(EN_NOUN) + "."]
        return " ".join(words)

    def mixed() -> str:
        text = zh()
        cut = rng.randrange(len(text))
        return text[:cut] + rng.choice(BRANDS) + text[cut:]

    captions = []
    for _ in range(n):
        text = rng.choice([zh, zh, zh, en, mixed])()
        if rng.random() < 0.3:
            text = rng.choice([text + zh(), text + " " + en(), text + rng.choice(EXTRAS)])
        if rng.random() < 0.01:
            text += rng.choice(RARE)
        captions.append(text)
    return captions


def texts_per_second(run: Callable[[], object], n: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        run()
        best = min(best, time.process_time() - start)
    return n / best


def measure(tok: ErnieTokenizer, texts: list[str], batch: int, repeats: int) -> tuple[float, float]:
    batched = texts_per_second(
        lambda: [tok(texts[i : i + batch]) for i in range(0, len(texts), batch)], len(texts), repeats
    )
    single = texts_per_second(lambda: [tok([t]) for t in texts], len(texts), repeats)
    return batched, single


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=Path, default=DEFAULT_VOCAB, help="vocab.txt (token<TAB>id lines)")
    parser.add_argument("--n", type=int, default=20_000, help="number of captions")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2,000 captions, one repeat")
    args = parser.parse_args(argv)
    if not args.vocab.is_file():
        parser.error(f"--vocab: file not found: {args.vocab}")
    n, repeats = (2_000, 1) if args.quick else (args.n, args.repeats)

    texts = make_captions(n)
    fast = ErnieTokenizer(args.vocab)
    reference = ErnieTokenizer(args.vocab, fast=False)
    if not fast(texts)["input_ids"].equal(reference(texts)["input_ids"]):
        raise SystemExit("fast and reference tokenizers disagree on the benchmark captions")
    routed = sum(not fast._uses_backend(t) for t in texts)
    mean_chars = sum(map(len, texts)) / n

    results = {
        name: measure(tok, texts, args.batch_size, repeats)
        for name, tok in (("fast", fast), ("reference", reference))
    }
    print(
        f"{n} captions, {mean_chars:.1f} chars on average, {routed} ({100 * routed / n:.1f}%) outside the "
        f"fast path's safe set; single process, CPU time, best of {repeats}"
    )
    print(f"{'':>12} {'batched (' + str(args.batch_size) + ')':>16} {'per sample':>14}   texts/s")
    for name, (batched, single) in results.items():
        print(f"{name:>12} {batched:>16,.0f} {single:>14,.0f}")
    ratio_b = results["fast"][0] / results["reference"][0]
    ratio_s = results["fast"][1] / results["reference"][1]
    print(f"{'fast / ref':>12} {ratio_b:>15.1f}x {ratio_s:>13.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
