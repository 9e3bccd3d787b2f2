"""`ErnieTokenizer`: the official ERNIE `FullTokenizer(do_lower_case=True)` + `prepare_input`, as tensors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ernievil2_train.text import reference
from ernievil2_train.text.fast import build_fast_tokenizer, fast_path_exact
from ernievil2_train.text.vocab import load_vocab

if TYPE_CHECKING:
    from tokenizers import Tokenizer

OFFICIAL_MAX_LEN = 48  # text length (tokens, with [CLS] and [SEP]) of the official ERNIE-ViL 2.0 models


def check_max_len(value: Any, key: str) -> None:
    """ValueError naming `key` unless `value`, a text length in tokens, is an integer of at least 2."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"{key}: must be an integer of at least 2 ([CLS] and [SEP]), got {value!r}")


class ErnieTokenizer:
    """Word-piece tokenizer with fixed-length `[CLS] pieces [SEP] [PAD]...` rows.

    Rows keep the first `max_len - 2` pieces. Texts made of characters the Rust backend handles exactly go
    through it; all others (and every text when `fast=False`) go through the pure-Python reference.
    """

    _unk = "[UNK]"

    def __init__(self, vocab_file: str | Path, max_len: int = OFFICIAL_MAX_LEN, fast: bool = True) -> None:
        check_max_len(max_len, "max_len")
        self.vocab_file = str(vocab_file)
        self.max_len = max_len
        self.fast = fast
        self.vocab = load_vocab(vocab_file)
        self._backend = self._build_backend()

    def _build_backend(self) -> Tokenizer | None:
        """The Rust tokenizer when `fast` (not pickled: rebuilt on unpickling), else None."""
        return build_fast_tokenizer(self.vocab, self._unk) if self.fast else None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_backend"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._backend = self._build_backend()

    @property
    def vocab_size(self) -> int:
        return max(self.vocab.values()) + 1

    @property
    def pad_id(self) -> int:
        return self.vocab["[PAD]"]

    @property
    def cls_id(self) -> int:
        return self.vocab["[CLS]"]

    @property
    def sep_id(self) -> int:
        return self.vocab["[SEP]"]

    @property
    def unk_id(self) -> int:
        return self.vocab[self._unk]

    def _uses_backend(self, text: str) -> bool:
        return self._backend is not None and fast_path_exact(text)

    def tokenize(self, text: str) -> list[str]:
        """Word pieces of `text`, without special tokens."""
        if self._uses_backend(text):
            return self._backend.encode(text, add_special_tokens=False).tokens
        return reference.tokenize(text, self.vocab, self._unk)

    def encode(self, text: str) -> list[int]:
        """Word-piece ids of `text`, without special tokens and without truncation."""
        if self._uses_backend(text):
            return self._backend.encode(text, add_special_tokens=False).ids
        return [self.vocab[piece] for piece in reference.tokenize(text, self.vocab, self._unk)]

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """`{"input_ids": LongTensor[len(texts), max_len]}` as the official `prepare_input` builds it."""
        if isinstance(texts, str):
            raise TypeError("ErnieTokenizer expects a list of strings, got a single str")
        body = self.max_len - 2
        rows = np.full((len(texts), self.max_len), self.pad_id, dtype=np.int64)
        rows[:, 0] = self.cls_id
        for i, text in enumerate(texts):
            ids = self.encode(text)[:body]
            rows[i, 1 : len(ids) + 1] = ids
            rows[i, len(ids) + 1] = self.sep_id
        return {"input_ids": torch.from_numpy(rows)}
