"""The pure-Python reference tokenizer: the official basic tokens, its character classes, WordPiece."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from ernievil2_train.text import reference


def _cases(paddle_ref: Path) -> list[dict]:
    lines = (paddle_ref / "tokenizer_cases.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_reference_basic_tokens(paddle_ref: Path) -> None:
    cases = _cases(paddle_ref)
    assert cases
    for case in cases:
        assert reference.basic_tokenize(case["text"]) == case["basic_tokens"], case["text"]


CJK_RANGE_STARTS = (0x4E00, 0x3400, 0x20000, 0x2A700, 0x2B740, 0x2B820, 0xF900, 0x2F800)
CJK_RANGE_ENDS = (0x9FFF, 0x4DBF, 0x2A6DF, 0x2B73F, 0x2B81F, 0x2CEAF, 0xFAFF, 0x2FA1F)


def _each_glued_to(code_points: tuple[int, ...], word: str) -> tuple[str, list[str]]:
    """A text where every character is followed by `word`, and its basic tokens if each one is split off.
    Code points unassigned in this Python's Unicode tables (category Cn, deleted) are left out."""
    chars = [chr(cp) for cp in code_points if unicodedata.category(chr(cp)) != "Cn"]
    return "".join(char + word for char in chars), [t for char in chars for t in (char, word)]


@pytest.mark.parametrize(
    ("text", "basic"),
    [
        ("İstanbul Ångström", ["istanbul", "angstrom"]),
        ("soft\u00adhyphen bell\x07x zero\u200bwidth \ufffdok", ["softhyphen", "bellx", "zerowidth", "ok"]),
        ("a\u2028b\u2029c\u3000d\u00a0e", ["a", "b", "c", "d", "e"]),
        ("ﬁ ＦＵＬＬ １２３", ["ﬁ", "ｆｕｌｌ", "１２３"]),
        ("〇〇 カタカナ 한국", ["〇〇", "カタカナ", "한국"]),
        ("\u0915\u094d \u0628\u064e", ["\u0915", "\u0628"]),
        ("￥199 a,b", ["￥199", "a", ",", "b"]),
        _each_glued_to(CJK_RANGE_STARTS, "x"),
        _each_glued_to(CJK_RANGE_ENDS, "y"),
        ("\U0002ceb0x \u3007y", ["\U0002ceb0x", "\u3007y"]),
        ("un\u0378assigned", ["unassigned"]),
    ],
)
def test_basic_tokenizer_conventions(text: str, basic: list[str]) -> None:
    """The documented BasicTokenizer rules: cleaning, whitespace, CJK split, accents, no NFKC. Accent
    stripping is NFD, so Hangul syllables and CJK compatibility ideographs come out decomposed."""
    assert reference.basic_tokenize(text) == [unicodedata.normalize("NFD", t) for t in basic]



PIECES = {"un": 0, "##aff": 1, "##able": 2, "a": 3, "##a": 4, ",": 5, "!": 6}


def test_wordpiece_takes_the_longest_known_piece_first() -> None:
    """Greedy from the left: the longest prefix in the vocab, then `##` pieces for the rest."""
    assert reference.wordpiece("unaffable", PIECES) == ["un", "##aff", "##able"]
    assert reference.wordpiece("unaffable", {**PIECES, "unaff": 7}) == ["unaff", "##able"]
    assert reference.wordpiece("aaa", PIECES) == ["a", "##a", "##a"]
    assert reference.wordpiece("", PIECES) == []


def test_a_word_that_cannot_be_covered_is_one_unk() -> None:
    """One unknown tail turns the whole word into a single `unk`, whatever pieces matched before it."""
    assert reference.wordpiece("unaffablex", PIECES) == ["[UNK]"]
    assert reference.wordpiece("affable", PIECES) == ["[UNK]"]
    assert reference.wordpiece("xyz", PIECES, unk="<unk>") == ["<unk>"]


def test_words_over_the_length_limit_are_unk() -> None:
    limit = reference.MAX_WORD_CHARS
    assert reference.wordpiece("a" * limit, PIECES) == ["a"] + ["##a"] * (limit - 1)
    assert reference.wordpiece("a" * (limit + 1), PIECES) == ["[UNK]"]


@pytest.mark.parametrize(
    ("word", "pieces"),
    [
        ("a,b", ["a", ",", "b"]),
        (",,", [",", ","]),
        ("a.b.", ["a", ".", "b", "."]),
        ("...x", [".", ".", ".", "x"]),
        ("word", ["word"]),
        ("", []),
    ],
)
def test_split_punctuation_makes_each_mark_its_own_piece(word: str, pieces: list[str]) -> None:
    assert reference.split_punctuation(word) == pieces


def test_every_ascii_symbol_is_punctuation() -> None:
    """All printable non-alphanumeric ASCII counts (also `$`, `^`, `` ` ``, which Unicode calls symbols);
    beyond ASCII only category P does, so a currency sign such as `¥` stays inside its word."""
    ascii_symbols = [chr(cp) for cp in range(33, 127) if not chr(cp).isalnum()]
    assert len(ascii_symbols) == 32
    assert all(reference.is_punctuation(c) for c in ascii_symbols)
    assert not any(reference.is_punctuation(c) for c in "aZ09 ¥©")
    assert all(reference.is_punctuation(c) for c in "，。“」")


def test_clean_text_drops_controls_and_maps_whitespace() -> None:
    """NUL, U+FFFD, controls and format characters go; tab, newline and Unicode spaces become one space
    each; a line separator (neither whitespace nor control here) is kept for `split` to handle."""
    text = "a\x00b\ufffdc\x07d\te\nf\u3000g\u200bh\u2028i\r"
    assert reference.clean_text(text) == "abcd e f gh\u2028i "


def test_tokenize_is_basic_tokens_then_wordpiece() -> None:
    """Lower-cased, punctuation split off, each word through WordPiece with the given `unk`."""
    assert reference.tokenize("Unaffable, a!", PIECES) == ["un", "##aff", "##able", ",", "a", "!"]
    assert reference.tokenize("Ünaffable zzz", PIECES, unk="<unk>") == ["un", "##aff", "##able", "<unk>"]
