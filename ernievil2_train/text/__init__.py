"""Text side: the official-equivalent ERNIE tokenizer."""

from __future__ import annotations

from ernievil2_train.text.tokenizer import ErnieTokenizer
from ernievil2_train.text.vocab import load_vocab

__all__ = ["ErnieTokenizer", "load_vocab"]
