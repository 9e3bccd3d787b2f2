"""What the command-line tools (embed, evaluate, similarity) load from a checkpoint folder: the model, its
vocabulary and the tokenizer, each refused with one line naming the flag when it does not fit."""

from __future__ import annotations

from pathlib import Path

import torch

from ernievil2_train.checkpoints import find_vocab, load_pretrained
from ernievil2_train.config_checks import not_a_folder
from ernievil2_train.models import DualEncoder
from ernievil2_train.text import ErnieTokenizer
from ernievil2_train.text.tokenizer import OFFICIAL_MAX_LEN
from ernievil2_train.text.vocab import check_vocab_fits, load_vocab


def load_checkpoint(path: str | Path, device: torch.device) -> DualEncoder:
    """`load_pretrained`, with a clear message when --checkpoint is a file (a Paddle one: to convert)."""
    if not str(path):
        raise ValueError("--checkpoint: empty path")
    if Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"--checkpoint: {not_a_folder(path)}")
    return load_pretrained(path, device=device)


def resolve_vocab(checkpoint: str | Path, vocab: str | Path | None) -> Path:
    """The checkpoint folder's vocab.txt, else the --vocab file (ValueError if there is neither, or if
    --vocab gives other token ids than the folder's own: its weights were trained with that one)."""
    found = find_vocab(checkpoint)
    if vocab is None:
        if found is None:
            raise ValueError(f"no vocabulary: pass --vocab or put vocab.txt into {checkpoint}")
        return found
    path = Path(vocab)
    if path.is_dir():
        raise ValueError(f"--vocab {path}: is a folder, not a file")
    if not path.exists():
        raise ValueError(f"--vocab {path}: file not found")
    if not path.is_file():
        raise ValueError(f"--vocab {path}: not a regular file (a pipe?); the vocabulary is read from disk")
    if found is not None and load_vocab(path) != load_vocab(found):
        raise ValueError(f"--vocab {path}: other token ids than the checkpoint's own {found}, which its "
                         "weights were trained with; leave --vocab out")
    return path


def load_tokenizer(vocab: Path, model: DualEncoder, max_len: int | None = None) -> ErnieTokenizer:
    """The tokenizer of `vocab` for `model` (ValueError naming the file or --max-len when they do not fit).
    Without `max_len`: the official 48 tokens, or the model's text positions when it has fewer."""
    limit = model.config.text.max_position_embeddings
    if max_len is None:
        max_len = min(OFFICIAL_MAX_LEN, limit)
    message = (
        f"--max-len {max_len}: must be between 2 and the checkpoint's {limit} text positions "
        "(max_position_embeddings)"
    )
    if max_len < 2:
        raise ValueError(message)
    tokenizer = ErnieTokenizer(vocab, max_len=max_len)
    check_vocab_fits(vocab, model.config.text.vocab_size)
    if max_len > limit:
        raise ValueError(message)
    return tokenizer
