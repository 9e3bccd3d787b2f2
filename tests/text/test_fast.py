"""The Rust fast path against the pure-Python reference: every safe character, and random strings."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from ernievil2_train.text import ErnieTokenizer, reference
from ernievil2_train.text.fast import SAFE_RANGES, build_fast_tokenizer, fast_path_exact, is_safe_char
from ernievil2_train.text.vocab import load_vocab


@pytest.fixture(scope="module")
def vocab(paddle_ref: Path) -> dict[str, int]:
    return load_vocab(paddle_ref / "vocab.txt")


@pytest.fixture(scope="module")
def backend(vocab: dict[str, int]):
    return build_fast_tokenizer(vocab, "[UNK]")


def _ref_ids(text: str, vocab: dict[str, int]) -> list[int]:
    return [vocab[p] for p in reference.tokenize(text, vocab)]


def test_backend_basic_tokens(backend, paddle_ref: Path) -> None:
    """The backend's normalizer and pre-tokenizer give the official basic tokens on every case it takes."""
    lines = (paddle_ref / "tokenizer_cases.jsonl").read_text(encoding="utf-8").splitlines()
    cases = [case for case in map(json.loads, filter(str.strip, lines)) if fast_path_exact(case["text"])]
    assert cases
    for case in cases:
        normalized = backend.normalizer.normalize_str(case["text"])
        words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]
        assert words == case["basic_tokens"], case["text"]


def test_every_safe_character_matches(backend, vocab: dict[str, int]) -> None:
    safe = [chr(cp) for lo, hi in SAFE_RANGES for cp in range(lo, hi + 1) if is_safe_char(chr(cp))]
    assert len(safe) > 100_000
    for template in ("{c}", "ab{c}cd{c}", "中{c}x {c}{c}"):
        texts = [template.format(c=c) for c in safe]
        fast = backend.encode_batch(texts, add_special_tokens=False)
        mismatched = [t for t, enc in zip(texts, fast, strict=True) if enc.ids != _ref_ids(t, vocab)]
        assert not mismatched, [f"U+{ord(t[0] if template == '{c}' else t[2]):04X}" for t in mismatched[:20]]


@pytest.mark.parametrize(
    "text",
    ["\U0002b820", "ΟΔΟΣ", "\u2e43", "abc\U000e0000d", "\ud800", "\u0378x", "\u302e가"],
)
def test_unsafe_texts_are_routed_to_reference(text: str, vocab: dict[str, int], paddle_ref: Path) -> None:
    assert not fast_path_exact(text)
    tok = ErnieTokenizer(paddle_ref / "vocab.txt")
    assert tok.encode(text) == _ref_ids(text, vocab)


def _random_text(rng: random.Random) -> str:
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
        "一只猫狗在草地上的红色球人男孩女孩桌子水果天空白云汽车建筑",
        " \t\n\r\u3000\u00a0\u2028\u2029\u200b\u2003",
        ".,!?;:'\"()[]{}-_/\\@#$%^&*+=<>|~`，。！？；：“”‘’《》（）【】、…—·",
        "\x00\x07\x1b\x7f\x85\ufffd\u00ad\u200d\ufeff\ue000\U000f0000\ud83d",
        "éèêëàâäôöûüçñÅåØøİıÆæßŒœ\u0301\u0308\u0327ΣσςΑΩωЖжПривет",
        "ＡＢＣａｂｃ１２３！＃￥ﬁﬂ①②Ⅷ½²™©℃",
        "😀🐱👍🐈❤️🇨🇳🏻\u200d♀️🥰🫠",
        "日本語のテキストカタカナひらがな한국어문장",
        "ا ب ت ث ج ح خ د ذ ر ز س ش ص ض ط ظ ع غ ف ق ك ل م ن ه و ي \u064b\u064e",
        "क ख ग ा ि ी ु \u093c\u094d ก ข ค \u0e31",
        "\U00020000\U0002a700\U0002b820\U0002b920\U0002ceb0\uf900\u2f00\u3400\u9fff\u2e43\u0378\u1abf",
    ]
    length = rng.choice([0, 1, 3, 8, 20, 40])
    pieces = []
    for _ in range(length):
        pool = pools[rng.randrange(len(pools))]
        repeat = 101 if rng.random() < 0.01 else rng.choice([1, 1, 2])
        pieces.append(pool[rng.randrange(len(pool))] * repeat)
    return "".join(pieces)


def test_random_strings_fast_equals_reference(paddle_ref: Path) -> None:
    rng = random.Random(20240607)
    texts = [_random_text(rng) for _ in range(3000)]
    fast = ErnieTokenizer(paddle_ref / "vocab.txt", max_len=64)
    slow = ErnieTokenizer(paddle_ref / "vocab.txt", max_len=64, fast=False)
    routed = sum(fast._uses_backend(t) for t in texts)
    assert 0.2 * len(texts) < routed < len(texts)
    for text in texts:
        assert fast.encode(text) == slow.encode(text), repr(text)
    assert fast(texts)["input_ids"].tolist() == slow(texts)["input_ids"].tolist()
