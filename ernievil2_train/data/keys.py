"""Stable integer keys for ids and texts, used to find duplicates inside a global batch."""

from __future__ import annotations

import hashlib


def stable_key(value: str) -> int:
    """A 63-bit integer from a string, identical across processes and runs (unlike `hash`)."""
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
