"""Stable integer keys: the same 63-bit key for a string in every process and run, distinct for distinct
strings."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

from ernievil2_train.data.keys import stable_key
from tests.conftest import REPO_ROOT

TEXTS = ["img3", "", "一只狗在草地上奔跑", "a", "a ", "data/#img0", "s3://bucket/set/00000.tar#000000001"]


def blake2b_63(text: str) -> int:
    """The documented scheme, by another route: the 8-byte BLAKE2b digest of the UTF-8 text read as a
    little-endian integer (its hex bytes reversed), the sign bit dropped."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()
    return int("".join(reversed([digest[i : i + 2] for i in range(0, 16, 2)])), 16) % 2**63


def test_known_strings_keep_their_keys() -> None:
    """Keys do not drift between releases: ranks of one job, and reruns, compare them."""
    assert [stable_key(text) for text in TEXTS] == [blake2b_63(text) for text in TEXTS]
    known = {"img3": 4171449811288742869, "": 3797230976420062948, "一只狗在草地上奔跑": 7344607121831380543}
    assert {text: blake2b_63(text) for text in known} == known  # the literals are the scheme's, not drift
    assert {text: stable_key(text) for text in known} == known


def test_another_process_with_another_hash_seed_gives_the_same_keys() -> None:
    """Unlike `hash`, which Python salts per process, a key is the same in every process."""
    script = ("import json, sys; from ernievil2_train.data.keys import stable_key; "
              "print(json.dumps([stable_key(t) for t in json.loads(sys.argv[1])]))")
    ours = [stable_key(text) for text in TEXTS]
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run([sys.executable, "-c", script, json.dumps(TEXTS)], env=env, cwd=REPO_ROOT,
                              capture_output=True, text=True, check=True)
        assert json.loads(done.stdout) == ours


def test_keys_are_non_negative_63_bit_integers() -> None:
    """Keys fit a signed int64 tensor without turning negative."""
    keys = [stable_key(f"caption {i}") for i in range(2000)]
    assert all(type(key) is int and 0 <= key < 2**63 for key in keys)
    assert max(keys) >= 2**62  # the top usable bit is used, not masked away


def test_distinct_strings_get_distinct_keys() -> None:
    """Texts that differ by a space, a character or only by their Unicode form are told apart."""
    texts = [*TEXTS, "ｉｍｇ3", "e\u0301", "\u00e9", *(f"image {i}" for i in range(20_000))]
    assert len(set(texts)) == len(texts)
    assert len({stable_key(text) for text in texts}) == len(texts)
