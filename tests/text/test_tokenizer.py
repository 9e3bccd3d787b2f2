"""ErnieTokenizer against the official tokenizer cases, both backends, plus its interface."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from ernievil2_train.text import ErnieTokenizer, load_vocab
from ernievil2_train.text.fast import fast_path_exact
from tests.checkpoints.reference import load_npz


def _cases(paddle_ref: Path) -> list[dict]:
    lines = (paddle_ref / "tokenizer_cases.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def vocab_file(paddle_ref: Path) -> Path:
    return paddle_ref / "vocab.txt"


@pytest.fixture(scope="module")
def tok_config(paddle_ref: Path) -> dict:
    return json.loads((paddle_ref / "config.json").read_text())["tokenizer"]


@pytest.fixture(scope="module", params=[True, False], ids=["fast", "reference"])
def tok(request, vocab_file: Path, tok_config: dict) -> ErnieTokenizer:
    return ErnieTokenizer(vocab_file, max_len=tok_config["max_text_seqlen"], fast=request.param)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_word_piece_conventions(fast: bool, tmp_path: Path) -> None:
    """README rules, on a vocabulary of our own: words over 100 characters and words that cannot be covered
    are one [UNK]; a currency sign is no punctuation, so it starts a word."""
    vocab = tmp_path / "vocab.txt"
    tokens = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "a", "##a", "￥", "##199", "##1", "[UNK]"]
    vocab.write_text("\n".join(f"{t}\t{i}" for i, t in enumerate(tokens)), encoding="utf-8")
    tok = ErnieTokenizer(vocab, max_len=8, fast=fast)
    assert tok.tokenize("a" * 100) == ["a"] + ["##a"] * 99
    assert tok.tokenize("a" * 101) == ["[UNK]"]
    assert tok.tokenize("😀😀😀") == ["[UNK]"]
    assert tok.tokenize("ﬁ") == ["[UNK]"]
    assert tok.tokenize("aa ab") == ["a", "##a", "[UNK]"]
    assert tok.tokenize("￥199") == ["￥", "##199"]
    assert tok(["", "   "])["input_ids"][:, :3].tolist() == [[tok.cls_id, tok.sep_id, tok.pad_id]] * 2


def test_tokens_and_ids(tok: ErnieTokenizer, paddle_ref: Path) -> None:
    for case in _cases(paddle_ref):
        assert tok.tokenize(case["text"]) == case["tokens"], case["text"]
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert len(case["ids"]) == case["num_ids"]


def test_input_ids(tok: ErnieTokenizer, paddle_ref: Path, tok_config: dict) -> None:
    cases = _cases(paddle_ref)
    out = tok([case["text"] for case in cases])
    assert set(out) == {"input_ids"}
    ids = out["input_ids"]
    assert ids.dtype == torch.long
    assert ids.shape == (len(cases), tok_config["max_text_seqlen"])
    assert ids.tolist() == [case["input_ids"] for case in cases]
    body = tok_config["max_text_seqlen"] - 2
    assert [case["truncated"] for case in cases] == [case["num_ids"] > body for case in cases]


def test_model_inputs_are_the_tokenized_texts(tok: ErnieTokenizer, paddle_ref: Path) -> None:
    inputs = load_npz(paddle_ref / "inputs.npz")
    texts = [str(text) for text in inputs["texts"]]
    assert tok(texts)["input_ids"].tolist() == inputs["input_ids"].tolist()


def test_fast_path_takes_the_cases_it_is_exact_for(vocab_file: Path, paddle_ref: Path) -> None:
    """Cases made of safe characters go through the Rust backend and it alone gives the official ids."""
    tok = ErnieTokenizer(vocab_file)
    cases = _cases(paddle_ref)
    fast = [case for case in cases if fast_path_exact(case["text"])]
    assert fast
    assert [tok._uses_backend(case["text"]) for case in cases] == [fast_path_exact(c["text"]) for c in cases]
    for case in fast:
        encoding = tok._backend.encode(case["text"], add_special_tokens=False)
        assert (encoding.tokens, encoding.ids) == (case["tokens"], case["ids"]), case["text"]


def test_special_ids_and_vocab_size(tok: ErnieTokenizer, vocab_file: Path, tok_config: dict) -> None:
    vocab = load_vocab(vocab_file)
    expected = (tok_config["pad_id"], tok_config["cls_id"], tok_config["sep_id"], tok_config["unk_id"])
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.unk_id) == expected
    assert tok.vocab_size == tok_config["max_id"] + 1
    assert len(vocab) == tok_config["unique_tokens"]
    lines = vocab_file.read_text(encoding="utf-8").splitlines()
    assert len(lines) == tok_config["vocab_file_lines"]
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.unk_id) == tuple(
        vocab[t] for t in ("[PAD]", "[CLS]", "[SEP]", "[UNK]")
    )
    assert tok.vocab_size == max(vocab.values()) + 1


def test_duplicate_token_keeps_last_id(tok: ErnieTokenizer, vocab_file: Path, tok_config: dict) -> None:
    lines = vocab_file.read_text(encoding="utf-8").splitlines()
    vocab = load_vocab(vocab_file)
    duplicates = {k: v for k, v in tok_config["duplicate_tokens"].items() if isinstance(v, list)}
    assert duplicates
    for token, ids in duplicates.items():
        assert [int(ln.split("\t")[1]) for ln in lines if ln.split("\t")[0] == token] == ids
        assert vocab[token] == ids[-1]
        assert tok.encode(token) == [ids[-1]]
    if "resolved_to" in tok_config["duplicate_tokens"]:
        assert tok_config["duplicate_tokens"]["resolved_to"] in [ids[-1] for ids in duplicates.values()]


def test_truncation_and_max_len(vocab_file: Path) -> None:
    tok = ErnieTokenizer(vocab_file, max_len=8)
    ids = tok.encode("一二三四五六七八九十")
    row = tok(["一二三四五六七八九十", ""])["input_ids"]
    assert row.shape == (2, 8)
    assert row[0].tolist() == [tok.cls_id, *ids[:6], tok.sep_id]
    assert row[1].tolist() == [tok.cls_id, tok.sep_id] + [tok.pad_id] * 6


@pytest.mark.parametrize("max_len", [1, 10.0, True, "48"])
def test_a_length_that_is_not_an_integer_of_at_least_two_is_refused(vocab_file: Path, max_len) -> None:
    with pytest.raises(ValueError, match=rf"^max_len: must be an integer of at least 2 .*got {max_len!r}$"):
        ErnieTokenizer(vocab_file, max_len=max_len)


def test_pickle_round_trip(tok: ErnieTokenizer) -> None:
    texts = ["一只猫 on a mat", "Ωmega ΣΑΣ"]
    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone(texts)["input_ids"], tok(texts)["input_ids"])


def test_plain_vocab_file(tmp_path: Path) -> None:
    path = tmp_path / "vocab.txt"
    path.write_text("[PAD]\n[CLS]\n[SEP]\n[UNK]\nhello\n##s\n$\n$\n", encoding="utf-8")
    tok = ErnieTokenizer(path, max_len=6)
    assert tok.encode("Hellos $ bye") == [4, 5, 7, 3]
    assert tok.vocab_size == 8
    assert tok(["hello"])["input_ids"].tolist() == [[1, 4, 2, 0, 0, 0]]


def test_missing_special_token_names_file(tmp_path: Path) -> None:
    path = tmp_path / "vocab.txt"
    path.write_text("[PAD]\t0\n[CLS]\t1\n[SEP]\t2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.txt.*\[UNK\]"):
        ErnieTokenizer(path)


def test_missing_vocab_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        ErnieTokenizer(tmp_path / "nope.txt")


def test_rejects_single_string(vocab_file: Path) -> None:
    with pytest.raises(TypeError):
        ErnieTokenizer(vocab_file)("a caption")
