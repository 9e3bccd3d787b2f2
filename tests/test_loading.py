"""What the tools load from a checkpoint folder: the model, its vocabulary and a tokenizer that fits both."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ernievil2_train.checkpoints import CheckpointError, save_pretrained
from ernievil2_train.loading import load_checkpoint, load_tokenizer, resolve_vocab
from ernievil2_train.text.tokenizer import OFFICIAL_MAX_LEN
from tests.data.shard_helpers import write_vocab
from tests.models.tiny import TINY, tiny_model


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A converted checkpoint folder of the tiny model, with the vocabulary beside its weights."""
    vocab = write_vocab(tmp_path / "vocab.txt", chars="一二三四五")
    return save_pretrained(tiny_model(), tmp_path / "ckpt", vocab_file=vocab)


def test_a_folder_loads_and_a_file_is_refused_naming_the_flag(folder: Path) -> None:
    model = load_checkpoint(folder, torch.device("cpu"))
    assert not model.training and model.config.text.vocab_size == TINY["text"]["vocab_size"]
    with pytest.raises(ValueError, match=r"^--checkpoint: .*model\.safetensors is a file, not a folder$"):
        load_checkpoint(folder / "model.safetensors", torch.device("cpu"))
    paddle_file = folder / "model.pdparams"
    paddle_file.write_bytes(b"\x80")
    with pytest.raises(ValueError, match=r"^--checkpoint: .*model\.pdparams is a Paddle checkpoint file: "
                       r"convert it into a checkpoint folder first \(python -m ernievil2_train\.convert "):
        load_checkpoint(paddle_file, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"^--checkpoint: empty path$"):
        load_checkpoint("", torch.device("cpu"))
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load_checkpoint(folder / "nope", torch.device("cpu"))


def test_the_vocabulary_is_the_flag_or_the_folders_own(folder: Path, tmp_path: Path) -> None:
    assert resolve_vocab(folder, None) == folder / "vocab.txt"
    same = tmp_path / "same.txt"
    same.write_bytes((folder / "vocab.txt").read_bytes().replace(b"\n", b"\r\n"))
    assert resolve_vocab(folder, same) == same
    other = write_vocab(tmp_path / "other.txt")
    with pytest.raises(ValueError, match=r"^--vocab .*other\.txt: other token ids than the checkpoint's own "
                                         r".*ckpt/vocab\.txt, which its weights were trained with"):
        resolve_vocab(folder, other)
    (folder / "vocab.txt").unlink()
    assert resolve_vocab(folder, other) == other
    with pytest.raises(ValueError, match=r"no vocabulary: pass --vocab or put vocab.txt into .*ckpt"):
        resolve_vocab(folder, None)
    with pytest.raises(ValueError, match=r"^--vocab .*: is a folder, not a file$"):
        resolve_vocab(folder, tmp_path)
    with pytest.raises(ValueError, match=r"^--vocab .*missing\.txt: file not found$"):
        resolve_vocab(folder, tmp_path / "missing.txt")
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    with pytest.raises(ValueError, match=r"^--vocab .*pipe: not a regular file \(a pipe\?\)"):
        resolve_vocab(folder, pipe)
    (folder / "vocab.txt").mkdir()
    with pytest.raises(ValueError, match=r"ckpt/vocab\.txt: is a folder; a checkpoint folder holds a file "):
        resolve_vocab(folder, None)


def test_a_text_length_beyond_the_positions_or_below_two_is_refused(folder: Path) -> None:
    model = load_checkpoint(folder, torch.device("cpu"))
    positions = model.config.text.max_position_embeddings
    vocab = folder / "vocab.txt"
    tokenizer = load_tokenizer(vocab, model, positions)
    assert tokenizer(["一二"])["input_ids"].shape == (1, positions)
    for bad in (positions + 1, 1):
        with pytest.raises(ValueError, match=rf"^--max-len {bad}: must be between 2 and .* {positions} text"):
            load_tokenizer(vocab, model, bad)


@pytest.mark.parametrize("positions", [16, 64])
def test_the_default_text_length_is_the_official_one_within_positions(tmp_path: Path, positions: int) -> None:
    """48 tokens, as the official tools; a model with fewer text positions takes as many as it has (it would
    refuse the official length)."""
    vocab = write_vocab(tmp_path / "vocab.txt", chars="一二三四五")
    model = tiny_model(text={**TINY["text"], "max_position_embeddings": positions})
    tokenizer = load_tokenizer(vocab, model)
    assert tokenizer(["一二"])["input_ids"].shape == (1, min(positions, OFFICIAL_MAX_LEN))


def test_a_vocabulary_larger_than_the_embedding_table_is_refused(folder: Path, tmp_path: Path) -> None:
    model = load_checkpoint(folder, torch.device("cpu"))
    chars = "".join(chr(0x4E00 + i) for i in range(model.config.text.vocab_size))
    large = write_vocab(tmp_path / "large.txt", chars=chars)
    top = model.config.text.vocab_size + 4  # the four special tokens before the characters
    with pytest.raises(ValueError, match=rf"large\.txt: ids go up to {top} but the model's text vocab_size"):
        load_tokenizer(large, model, 8)
