"""Rust (`tokenizers`) fast path of the ERNIE tokenizer, and the check that says when it is exact.

`BertNormalizer` + `BertPreTokenizer` + `WordPiece` reproduce the official tokenizer except where their
Unicode tables disagree with Python's `unicodedata` (unassigned code points, which Python deletes as category
Cn but the Rust normalizer keeps; marks and punctuation added in recent Unicode versions; CJK extension C,
whose range the Rust side starts at U+2B920 instead of U+2B820) and for the final sigma of `str.lower`.
Texts made only of characters from `SAFE_RANGES` take the fast path; any other text goes to the reference.
`tests/text/test_fast.py` checks every safe character, so a library upgrade that breaks this shows up there.
"""

from __future__ import annotations

import functools
import re
import unicodedata

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordPiece

from ernievil2_train.text.reference import MAX_WORD_CHARS

# Blocks that cover realistic caption text: Latin, Greek, Cyrillic, punctuation and symbols, CJK, kana,
# hangul, full-width forms, emoji.
SAFE_RANGES = (
    (0x0000, 0x052F),
    (0x1E00, 0x1EFF),
    (0x2000, 0x2BFF),
    (0x2E00, 0x2E42),
    (0x3000, 0x33FF),
    (0x3400, 0x9FFF),
    (0xAC00, 0xD7AF),
    (0xF900, 0xFAFF),
    (0xFE00, 0xFE4F),
    (0xFEFF, 0xFEFF),
    (0xFF00, 0xFFEF),
    (0xFFFD, 0xFFFD),
    (0x1F000, 0x1FAFF),
    (0x20000, 0x2B81F),
    (0x2B920, 0x2CEAF),
)
# GREEK CAPITAL SIGMA lower-cases by context in Python (final sigma), character by character in Rust.
CONTEXT_DEPENDENT = frozenset({"\u03a3"})


def is_safe_char(char: str) -> bool:
    """Whether the fast path treats `char` exactly like the reference, in any context."""
    cp = ord(char)
    if char in CONTEXT_DEPENDENT or not any(lo <= cp <= hi for lo, hi in SAFE_RANGES):
        return False
    category = unicodedata.category(char)
    # Unassigned code points; non-Mn marks with a combining class would be reordered by NFD but not stripped.
    return category != "Cn" and not (unicodedata.combining(char) and category != "Mn")


def _char_class(code_points: list[int]) -> str:
    spans: list[list[int]] = []
    for cp in code_points:
        if spans and spans[-1][1] == cp - 1:
            spans[-1][1] = cp
        else:
            spans.append([cp, cp])
    return "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in spans)


@functools.cache
def unsafe_char_pattern() -> re.Pattern[str]:
    """A regex that finds the first character outside the safe set."""
    safe = [cp for lo, hi in SAFE_RANGES for cp in range(lo, hi + 1) if is_safe_char(chr(cp))]
    return re.compile(f"[^{_char_class(safe)}]")


def fast_path_exact(text: str) -> bool:
    """Whether the fast path tokenizes `text` exactly like the reference (every character is safe)."""
    return unsafe_char_pattern().search(text) is None


def build_fast_tokenizer(vocab: dict[str, int], unk_token: str) -> Tokenizer:
    """BERT normalizer (clean, space CJK, strip accents, lower-case), BERT pre-tokenizer, WordPiece."""
    tokenizer = Tokenizer(WordPiece(vocab, unk_token=unk_token, max_input_chars_per_word=MAX_WORD_CHARS))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tokenizer
