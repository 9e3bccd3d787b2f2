"""Fast parsing of space-separated decimal floats, bit-identical to `float()` followed by a float32 cast.

Plain decimals (`-0.0123`, `12.5`, `3`) are parsed vectorised: each token's digits are aligned on its
decimal point, read as one exact integer (at most 15 digits, so exact in float64) and divided once by a power
of ten. Both operands are exact, so the IEEE division is correctly rounded, exactly like `float()` (Clinger's
fast path). Anything else (exponents, long mantissas, `nan`, malformed text) goes through `float()` itself.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

INT_DIGITS = 3  # digits before the point handled by the fast path
FRAC_DIGITS = 12  # digits after it: every mantissa has at most 15 digits, below 2**53
_WIDTH = INT_DIGITS + 1 + FRAC_DIGITS  # 16 bytes: two little-endian uint64 lanes "ddd.ffff" "ffffffff"
BLOCK_BYTES = 1 << 23
_ZEROS = np.uint64(0x3030303030303030)


def _byte_mask(lo: int, hi: int, base: int) -> int:
    """uint64 with 0xFF in the bytes of lane positions base..base+7 inside [lo, hi), except the point."""
    return sum(0xFF << (8 * k) for k in range(8) if lo <= base + k < hi and base + k != INT_DIGITS)


# Indexed by (first digit offset, end offset) inside the 16-byte window.
_MASK_A = np.array([[_byte_mask(lo, hi, 0) for hi in range(_WIDTH + 1)] for lo in range(INT_DIGITS + 1)],
                   dtype=np.uint64)
_MASK_B = np.array([_byte_mask(0, hi, 8) for hi in range(_WIDTH + 1)], dtype=np.uint64)


def _owner(starts: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Index of the token containing each byte position."""
    return np.searchsorted(starts, positions, side="right") - 1


def _eight_digits(lane: np.ndarray) -> np.ndarray:
    """Value of 8 ASCII digits per uint64 (first digit in the lowest byte), by SWAR multiply-shift."""
    v = (lane & np.uint64(0x0F0F0F0F0F0F0F0F)) * np.uint64(2561) >> np.uint64(8)
    v = (v & np.uint64(0x00FF00FF00FF00FF)) * np.uint64(6553601) >> np.uint64(16)
    return (v & np.uint64(0x0000FFFF0000FFFF)) * np.uint64(42949672960001) >> np.uint64(32)


def _fast_values(lanes: np.ndarray, starts: np.ndarray, ends: np.ndarray, dots: np.ndarray,
                 signed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values of plain-decimal tokens and a mask of the tokens the fast path cannot take."""
    digit_start = starts + signed
    num_digits = ends - digit_start - (dots < ends)
    origin = dots - INT_DIGITS
    slow = (num_digits == 0) | (digit_start < origin) | (ends > origin + _WIDTH)
    origin[slow] = 0
    mask_a = _MASK_A[np.clip(digit_start - origin, 0, INT_DIGITS), np.clip(ends - origin, 0, _WIDTH)]
    mask_b = _MASK_B[np.clip(ends - origin, 0, _WIDTH)]
    a = _eight_digits((lanes[origin] & mask_a) | (_ZEROS & ~mask_a))  # "ddd0ffff"
    b = _eight_digits((lanes[origin + 8] & mask_b) | (_ZEROS & ~mask_b))  # "ffffffff"
    mantissa = (a // np.uint64(100_000)) * np.uint64(10**12) + (a % np.uint64(10_000)) * np.uint64(10**8) + b
    values = mantissa.astype(np.float64) / 10.0**FRAC_DIGITS
    return np.where(signed.astype(bool), -values, values), slow


def _first_dot(buf: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Offset of the first '.' among each token's first INT_DIGITS + 2 bytes (a sign, the integer digits and
    the point), or _WIDTH if there is none there."""
    offset = np.full(starts.size, _WIDTH, dtype=np.int64)
    for k in range(INT_DIGITS + 1, -1, -1):  # the smallest offset is written last
        offset[buf[starts + k] == 46] = k
    return offset


def parse_floats(text: str, threads: int | None = None) -> np.ndarray:
    """Parse `text` (numbers separated by single spaces) into float32; ValueError on any bad token."""
    if not text.isascii():
        return np.array([float(t) for t in text.split(" ")], dtype=np.float64).astype(np.float32)
    return parse_ascii(text.encode("ascii"), threads)


def parse_ascii(raw: bytes, threads: int | None = None) -> np.ndarray:
    """Parse ASCII numbers separated by single spaces, tabs or newlines into float32 (ValueError if bad).

    The input is cut at separators into blocks of about `BLOCK_BYTES`, parsed by a thread pool (numpy
    releases the GIL in the heavy steps), so temporaries stay small and both cores work.
    """
    # Padded on both sides so every token's 16-byte window lies inside the buffer.
    padded = b" " * _WIDTH + raw + b" " * _WIDTH
    cuts = [_WIDTH]
    end = _WIDTH + len(raw)
    while end - cuts[-1] > BLOCK_BYTES:
        pos = cuts[-1] + BLOCK_BYTES
        cut = min((c for c in (padded.find(sep, pos, end) for sep in (b" ", b"\t", b"\n")) if c >= 0),
                  default=-1)
        if cut < 0:
            break
        cuts.append(cut + 1)
    blocks = [(padded, lo, hi - 1) for lo, hi in itertools.pairwise(cuts)] + [(padded, cuts[-1], end)]
    if len(blocks) == 1:
        return _parse_block(*blocks[0])
    with ThreadPoolExecutor(threads or min(os.cpu_count() or 1, 8)) as pool:
        return np.concatenate(list(pool.map(lambda block: _parse_block(*block), blocks)))


def _parse_block(padded: bytes, lo: int, hi: int) -> np.ndarray:
    """Parse the tokens in padded[lo:hi]; all positions are offsets into `padded`."""
    buf = np.frombuffer(padded, dtype=np.uint8)
    body = buf[lo:hi]
    is_sep = (body == 32) | (body == 9) | (body == 10)
    seps = np.flatnonzero(is_sep) + lo
    starts = np.concatenate(([lo], seps + 1))
    ends = np.concatenate((seps, [hi]))
    ntok = starts.size
    lanes = np.ndarray(shape=(len(padded) - 7,), dtype="<u8", buffer=padded, strides=(1,))
    num_dots = int(np.count_nonzero(body == 46))
    offset = _first_dot(buf, starts)
    has_dot = offset < ends - starts
    slow = np.zeros(ntok, dtype=bool)
    if int(np.count_nonzero(has_dot)) == num_dots:
        dots = np.where(has_dot, starts + offset, ends)
    else:  # a token with two dots, or a dot further in: locate every dot exactly
        dots = ends.copy()
        dot_pos = np.flatnonzero(body == 46) + lo
        dot_tok = _owner(starts, dot_pos)
        dots[dot_tok] = dot_pos
        slow[dot_tok[np.flatnonzero(np.diff(dot_tok) == 0)]] = True
    bad = (body > 57) | (body < 45) & ~is_sep | (body == 47)
    slow[_owner(starts, np.flatnonzero(bad) + lo)] = True
    minus = np.flatnonzero(body == 45) + lo
    before = buf[minus - 1]
    slow[_owner(starts, minus[(before != 32) & (before != 9) & (before != 10)])] = True  # '-' inside
    signed = (buf[starts] == 45).astype(np.int64)
    values, fast_slow = _fast_values(lanes, starts, ends, dots, signed)
    slow |= fast_slow
    for t in np.flatnonzero(slow).tolist():
        values[t] = float(padded[starts[t] : ends[t]].decode())
    return values.astype(np.float32)
