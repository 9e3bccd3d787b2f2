"""Pure-Python ERNIE tokenizer: the official BERT-style BasicTokenizer + WordPiece, written from its spec.

This is the readable oracle that the fast path is tested against, and its fallback for inputs the fast
path cannot reproduce exactly.
"""

from __future__ import annotations

import unicodedata

# CJK ideograph blocks that get surrounded by spaces (kana, hangul and full-width forms are not among them).
CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)
MAX_WORD_CHARS = 100


def is_cjk(char: str) -> bool:
    cp = ord(char)
    return any(lo <= cp <= hi for lo, hi in CJK_RANGES)


def is_whitespace(char: str) -> bool:
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def is_control(char: str) -> bool:
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def is_punctuation(char: str) -> bool:
    """Every non-alphanumeric printable ASCII character, and Unicode category P*."""
    cp = ord(char)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def clean_text(text: str) -> str:
    """Delete NUL, U+FFFD and control characters; map whitespace to a plain space."""
    out = []
    for char in text:
        if char in "\x00\ufffd" or is_control(char):
            continue
        out.append(" " if is_whitespace(char) else char)
    return "".join(out)


def space_cjk(text: str) -> str:
    return "".join(f" {char} " if is_cjk(char) else char for char in text)


def strip_accents(text: str) -> str:
    return "".join(char for char in unicodedata.normalize("NFD", text) if unicodedata.category(char) != "Mn")


def split_punctuation(word: str) -> list[str]:
    pieces: list[str] = []
    start_new = True
    for char in word:
        if is_punctuation(char):
            pieces.append(char)
            start_new = True
        else:
            if start_new:
                pieces.append("")
                start_new = False
            pieces[-1] += char
    return pieces


def basic_tokenize(text: str) -> list[str]:
    """BasicTokenizer with do_lower_case=True: clean, space CJK, lower, strip accents, split punctuation."""
    pieces: list[str] = []
    for word in space_cjk(clean_text(text)).split():
        pieces.extend(split_punctuation(strip_accents(word.lower())))
    return " ".join(pieces).split()


def wordpiece(word: str, vocab: dict[str, int], unk: str = "[UNK]") -> list[str]:
    """Greedy longest-match-first with the `##` continuation prefix; an uncoverable word is one `unk`."""
    if len(word) > MAX_WORD_CHARS:
        return [unk]
    pieces = []
    start = 0
    while start < len(word):
        end = len(word)
        while end > start:
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocab:
                break
            end -= 1
        else:
            return [unk]
        pieces.append(piece)
        start = end
    return pieces


def tokenize(text: str, vocab: dict[str, int], unk: str = "[UNK]") -> list[str]:
    return [piece for word in basic_tokenize(text) for piece in wordpiece(word, vocab, unk)]
