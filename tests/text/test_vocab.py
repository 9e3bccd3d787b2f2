"""Vocabulary loading: both line formats, the official loader's rules, and clear errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ernievil2_train.text.vocab import SPECIAL_TOKENS, check_vocab_fits, load_vocab


def write(tmp_path: Path, text: str, name: str = "vocab.txt") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_reference_vocab_matches_the_tokenizer_config(paddle_ref: Path) -> None:
    """The official file loads with its documented token count, id range and special ids."""
    tok = json.loads((paddle_ref / "config.json").read_text())["tokenizer"]
    vocab = load_vocab(paddle_ref / tok["vocab"])
    assert len(vocab) == tok["unique_tokens"]
    assert max(vocab.values()) == tok["max_id"]
    assert [vocab[t] for t in SPECIAL_TOKENS] == [tok["pad_id"], tok["cls_id"], tok["sep_id"], tok["unk_id"]]


def test_plain_lines_take_their_line_number(tmp_path: Path) -> None:
    """One token per line: the id is the 0-based line number, blank lines and stripped space included."""
    vocab = load_vocab(write(tmp_path, "[PAD]\n[CLS]\n  [SEP] \n[UNK]\n\nhello\n"))
    assert vocab == {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3, "": 4, "hello": 5}


def test_tab_lines_take_their_written_id(tmp_path: Path) -> None:
    """`token<TAB>id` lines keep their id whatever the line order; both formats mix in one file."""
    vocab = load_vocab(write(tmp_path, "[UNK]\t9\n[PAD]\t0\n[CLS]\t1\n[SEP]\t2\nplain\n hi \t7\r\n"))
    assert vocab == {"[UNK]": 9, "[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "plain": 4, "hi": 7}


def test_a_token_seen_twice_keeps_its_last_id(tmp_path: Path) -> None:
    vocab = load_vocab(write(tmp_path, "[PAD]\t0\n[CLS]\t1\n[SEP]\t2\n[UNK]\t3\n$\t4\nx\t5\n$\t6\n"))
    assert vocab["$"] == 6 and len(vocab) == 6


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


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[PAD]\t0\n[CLS]\t1\tx\n", r"vocab\.txt:2: expected 'token<TAB>id' or 'token' \(3 fields\)"),
        ("[PAD]\t0\n[CLS]\t1.5\n", r"vocab\.txt:2: token id '1\.5' is not an integer"),
        ("", r"vocab file is empty: .*vocab\.txt"),
        ("[CLS]\n[PAD]\nword\n", r"vocab file .*vocab\.txt lacks the special token\(s\) \[SEP\], \[UNK\]$"),
        # the model masks id 0 as padding: a [PAD] elsewhere would leave padding unmasked and mask a word
        ("[CLS]\n[PAD]\n[SEP]\n[UNK]\n", r"vocab\.txt: \[PAD\] has id 1, but the text tower masks id 0 as "),
    ],
)
def test_bad_vocab_files_give_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        load_vocab(write(tmp_path, text))
    assert "\n" not in str(err.value)


def test_missing_vocab_file_or_a_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"vocab file not found: .*nope\.txt"):
        load_vocab(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match=r"vocab file .* is a folder \(a checkpoint folder's is "):
        load_vocab(tmp_path)


def test_vocab_fits_a_text_tower_exactly_its_size(tmp_path: Path) -> None:
    """The largest id must be below `vocab_size`: equal to `vocab_size - 1` fits, one more does not."""
    path = write(tmp_path, "[PAD]\n[CLS]\n[SEP]\n[UNK]\nlast\t11\n")
    check_vocab_fits(path, 12)
    too_small = r"vocab\.txt: ids go up to 11 but the model's text vocab_size is 11"
    with pytest.raises(ValueError, match=too_small):
        check_vocab_fits(path, 11)


def test_vocab_with_a_negative_id_does_not_fit(tmp_path: Path) -> None:
    path = write(tmp_path, "[PAD]\n[CLS]\n[SEP]\n[UNK]\nodd\t-2\n")
    with pytest.raises(ValueError, match=r"vocab\.txt: negative token id -2"):
        check_vocab_fits(path, 100)


def test_reference_vocab_fits_the_reference_model(paddle_ref: Path) -> None:
    """The official vocab fits the reference text tower and is refused by one a token smaller."""
    config = json.loads((paddle_ref / "config.json").read_text())
    path = paddle_ref / config["tokenizer"]["vocab"]
    check_vocab_fits(path, config["text"]["vocab_size"])
    smaller = config["tokenizer"]["max_id"]
    too_small = f"ids go up to {smaller} but the model's text vocab_size is {smaller}"
    with pytest.raises(ValueError, match=too_small):
        check_vocab_fits(path, smaller)
