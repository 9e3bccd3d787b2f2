"""ErnieTokenizer against the official tokenizer cases, both backends, plus its interface."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from ernievil2_train.text import ErnieTokenizer, load_vocab, reference


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


def test_reference_basic_tokens(paddle_ref: Path) -> None:
    cases = _cases(paddle_ref)
    assert cases
    for case in cases:
        assert reference.basic_tokenize(case["text"]) == case["basic_tokens"], case["text"]


def test_tokens_and_ids(tok: ErnieTokenizer, paddle_ref: Path) -> None:
    for case in _cases(paddle_ref):
        assert tok.tokenize(case["text"]) == case["tokens"], case["text"]
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert len(case["ids"]) == case["num_ids"]


def test_input_ids(tok: ErnieTokenizer, paddle_ref: Path) -> None:
    cases = _cases(paddle_ref)
    out = tok([case["text"] for case in cases])
    assert set(out) == {"input_ids"}
    ids = out["input_ids"]
    assert ids.dtype == torch.long
    assert ids.shape == (len(cases), len(cases[0]["input_ids"]))
    assert ids.tolist() == [case["input_ids"] for case in cases]


def test_fast_path_covers_the_cases(vocab_file: Path, paddle_ref: Path) -> None:
    tok = ErnieTokenizer(vocab_file)
    cases = _cases(paddle_ref)
    assert sum(tok._uses_backend(case["text"]) for case in cases) == len(cases)


def test_special_ids_and_vocab_size(tok: ErnieTokenizer, vocab_file: Path, tok_config: dict) -> None:
    vocab = load_vocab(vocab_file)
    expected = (tok_config["pad_id"], tok_config["cls_id"], tok_config["sep_id"], tok_config["unk_id"])
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.unk_id) == expected
    assert tok.vocab_size == tok_config["max_id"] + 1
    assert len(vocab) == tok_config["unique_tokens"]
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.unk_id) == tuple(
        vocab[t] for t in ("[PAD]", "[CLS]", "[SEP]", "[UNK]")
    )
    assert tok.vocab_size == max(vocab.values()) + 1
    assert tok.encode("$") == [vocab["$"]]


def test_duplicate_token_keeps_last_id(vocab_file: Path, tok_config: dict) -> None:
    lines = vocab_file.read_text(encoding="utf-8").splitlines()
    vocab = load_vocab(vocab_file)
    for token, ids in tok_config["duplicate_tokens"].items():
        if isinstance(ids, list):
            assert [int(ln.split("\t")[1]) for ln in lines if ln.split("\t")[0] == token] == ids
            assert vocab[token] == ids[-1]


def test_truncation_and_max_len(vocab_file: Path) -> None:
    tok = ErnieTokenizer(vocab_file, max_len=8)
    ids = tok.encode("一二三四五六七八九十")
    row = tok(["一二三四五六七八九十", ""])["input_ids"]
    assert row.shape == (2, 8)
    assert row[0].tolist() == [tok.cls_id, *ids[:6], tok.sep_id]
    assert row[1].tolist() == [tok.cls_id, tok.sep_id] + [tok.pad_id] * 6


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


def test_bad_vocab_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "vocab.txt"
    path.write_text("[PAD]\t0\n[CLS]\tone\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.txt:2"):
        load_vocab(path)


def test_vocab_that_is_not_utf8_names_file(tmp_path: Path) -> None:
    path = tmp_path / "vocab.txt"
    path.write_bytes(b"[PAD]\n[CLS]\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"vocab\.txt: not a UTF-8 vocab file"):
        load_vocab(path)


def test_missing_vocab_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        ErnieTokenizer(tmp_path / "nope.txt")


def test_rejects_single_string(vocab_file: Path) -> None:
    with pytest.raises(TypeError):
        ErnieTokenizer(vocab_file)("a caption")
