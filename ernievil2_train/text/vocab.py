"""Vocabulary file loading, with the official loader's rules."""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[UNK]")
PAD_ID = 0  # the id of [PAD]: the text tower masks the keys that hold it


def load_vocab(path: str | Path) -> dict[str, int]:
    """Read `token<TAB>id` lines (or one token per line, id = line number), UTF-8.

    Like the official loader, each line is stripped first and a token seen twice keeps its last id
    (in the ERNIE 3.0 vocab `$` appears as 12084 and 18005, so `$` -> 18005).
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"vocab file {path} is a folder (a checkpoint folder's is {path}/vocab.txt)")
    if not path.is_file():
        raise FileNotFoundError(f"vocab file not found: {path}")
    vocab: dict[str, int] = {}
    try:
        with path.open(encoding="utf-8") as f:
            for num, line in enumerate(f):
                fields = line.strip().split("\t")
                if len(fields) > 2:
                    raise ValueError(
                        f"{path}:{num + 1}: expected 'token<TAB>id' or 'token' ({len(fields)} fields)"
                    )
                token = fields[0].strip()
                try:
                    vocab[token] = int(fields[1]) if len(fields) == 2 else num
                except ValueError:
                    raise ValueError(f"{path}:{num + 1}: token id {fields[1]!r} is not an integer") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 vocab file ({err.reason} at byte {err.start})") from None
    if not vocab:
        raise ValueError(f"vocab file is empty: {path}")
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"vocab file {path} lacks the special token(s) {', '.join(missing)}")
    if vocab["[PAD]"] != PAD_ID:
        raise ValueError(f"{path}: [PAD] has id {vocab['[PAD]']}, but the text tower masks id {PAD_ID} as "
                         "padding (an ERNIE vocabulary puts [PAD] first)")
    return vocab


def same_token_ids(a: str | Path, b: str | Path) -> bool:
    """Whether two existing vocabulary files give every token the same id (one file twice: not read)."""
    return Path(a).samefile(b) or load_vocab(a) == load_vocab(b)


def check_vocab_fits(path: str | Path, vocab_size: int) -> None:
    """Raise ValueError naming `path` unless its ids fit a text tower of `vocab_size` embeddings."""
    ids = load_vocab(path).values()
    if min(ids) < 0:
        raise ValueError(f"{path}: negative token id {min(ids)}")
    if max(ids) >= vocab_size:
        raise ValueError(
            f"{path}: ids go up to {max(ids)} but the model's text vocab_size is {vocab_size} "
            "(wrong vocabulary for this model?)"
        )
