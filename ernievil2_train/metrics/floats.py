"""Fast parsing of separated decimal floats, bit-identical to `float()` followed by a float32 cast.

Tokens are separated by single spaces, tabs or newlines. Plain decimals (`-0.0123`, `12.5`, `3`) are
parsed vectorised: each token's 16-byte window is aligned on its decimal point, its digits are checked
and read as one exact integer (at most 15 digits, so exact in float64) and divided once by a power of
ten. Both operands are exact, so the IEEE division is correctly rounded, exactly like `float()`
(Clinger's fast path). Anything else (exponents, long mantissas, `nan`, malformed text) goes through
`float()` itself.
"""

from __future__ import annotations

import itertools
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

INT_DIGITS = 3  # digits before the point handled by the fast path
FRAC_DIGITS = 12  # digits after it: every mantissa has at most 15 digits, below 2**53
PAD = INT_DIGITS + 1 + FRAC_DIGITS  # 16 bytes: two little-endian uint64 lanes "ddd.ffff" "ffffffff"
BLOCK_BYTES = 1 << 21  # per-block temporaries stay in a core's cache
_MINUS, _DOT = 45, 46
_SEPARATOR_BELOW = 43  # '+': every byte below it is taken for a separator, then checked to be one
_ZEROS = np.uint64(0x3030303030303030)
_HIGH_NIBBLES = np.uint64(0xF0F0F0F0F0F0F0F0)
_PLUS_SIX = np.uint64(0x0606060606060606)


def _byte_mask(lo: int, hi: int, base: int) -> int:
    """uint64 with 0xFF in the bytes of lane positions base..base+7 inside [lo, hi), except the point."""
    return sum(0xFF << (8 * k) for k in range(8) if lo <= base + k < hi and base + k != INT_DIGITS)


# Indexed by first digit offset * (PAD + 1) + end offset in the 16-byte window (lane A), or end offset (B).
_MASK_A = np.array([_byte_mask(lo, hi, 0) for lo in range(INT_DIGITS + 1) for hi in range(PAD + 1)],
                   dtype=np.uint64)
_MASK_B = np.array([_byte_mask(0, hi, 8) for hi in range(PAD + 1)], dtype=np.uint64)
_FILL_A, _FILL_B = _ZEROS & ~_MASK_A, _ZEROS & ~_MASK_B


class _Irregular(Exception):
    """A byte below '+' that is not a separator: the block needs the general reader."""


def _digits(
    lanes: np.ndarray, at: np.ndarray, mask: np.ndarray, fill: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The 8 window bytes at `at`, with bytes outside `mask` read as '0'; and whether all are ASCII digits."""
    lane = lanes[at]
    lane &= mask
    lane |= fill
    ok = (lane & _HIGH_NIBBLES) == _ZEROS
    ok &= ((lane + _PLUS_SIX) & _HIGH_NIBBLES) == _ZEROS
    return lane, ok


def _four_digit_pairs(lane: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values of the first and last 4 ASCII digits of each uint64 (first digit in the lowest byte)."""
    v = (lane & np.uint64(0x0F0F0F0F0F0F0F0F)) * np.uint64(2561) >> np.uint64(8)
    v = (v & np.uint64(0x00FF00FF00FF00FF)) * np.uint64(6553601) >> np.uint64(16)
    low16 = np.uint64(0xFFFF)
    return (v & low16).astype(np.float64), ((v >> np.uint64(32)) & low16).astype(np.float64)


def _fast_values(lanes: np.ndarray, starts: np.ndarray, ends: np.ndarray, dots: np.ndarray,
                 signed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values of plain-decimal tokens and a mask of the tokens the fast path cannot take."""
    origin = dots - INT_DIGITS
    first = starts + signed - origin  # first digit's offset in the window
    end = ends - origin
    slow = (first < 0) | (end > PAD) | (end - first - (dots < ends) <= 0)
    origin[slow] = 0
    first[slow] = 0
    end[slow] = 0
    first *= PAD + 1
    first += end
    a, ok = _digits(lanes, origin, _MASK_A.take(first), _FILL_A.take(first))  # "ddd0ffff"
    origin += 8
    b, ok_b = _digits(lanes, origin, _MASK_B.take(end), _FILL_B.take(end))  # "ffffffff"
    slow |= ~(ok & ok_b)
    int_part, frac_high = _four_digit_pairs(a)  # "ddd0" = 10 * the integer part, "ffff"
    frac_low_high, frac_low_low = _four_digit_pairs(b)
    values = int_part * 1e11  # every partial sum is an integer below 1e15: exact
    values += frac_high * 1e8
    values += frac_low_high * 1e4
    values += frac_low_low
    values /= 10.0**FRAC_DIGITS
    np.copysign(values, 0.5 - signed, out=values)  # negative where the token has a sign
    return values, slow


def _dots(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, signed: np.ndarray) -> np.ndarray:
    """Position of each token's decimal point, or its end if there is none in its first INT_DIGITS + 2 bytes.

    Most tokens are "d.ddd" or "-d.ddd", so that place is tried first; the others are searched. A wrong
    guess only costs speed: the digit check then sends the token to `float()`.
    """
    dots = starts + signed
    dots += 1
    missed = np.flatnonzero(buf[dots] != _DOT)
    if missed.size:
        head = starts[missed]
        found = ends[missed]
        for k in range(INT_DIGITS + 1, -1, -1):  # the smallest offset is written last
            at = head + k
            hit = buf[at] == _DOT
            found[hit] = at[hit]
        dots[missed] = found
    np.minimum(dots, ends, out=dots)
    return dots


def _parse_block(buf: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 values, the separator byte after each token) of the tokens in buf[lo:hi]; buf[hi] must be
    a separator or padding, and PAD bytes either side of the block must be readable."""
    seps = np.flatnonzero(buf[lo:hi] < _SEPARATOR_BELOW)
    seps += lo
    seps = np.append(seps, hi)
    kinds = buf[seps]
    if not _is_separator(kinds).all():
        raise _Irregular
    starts = np.empty_like(seps)
    starts[0] = lo
    starts[1:] = seps[:-1] + 1
    lanes = np.ndarray(shape=(buf.size - 7,), dtype="<u8", buffer=buf, strides=(1,))
    signed = (buf[starts] == _MINUS).view(np.int8).astype(np.int64)
    dots = _dots(buf, starts, seps, signed)
    values, slow = _fast_values(lanes, starts, seps, dots, signed)
    for t in np.flatnonzero(slow).tolist():
        values[t] = float(buf[starts[t] : seps[t]].tobytes().decode())
    return values.astype(np.float32), kinds


def _parse_general(buf: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """The same by `float()` on every token, for blocks with other bytes below '+' (such as CR)."""
    parts = re.split(rb"([ \t\n])", buf[lo:hi].tobytes())  # tokens and the separators between them
    kinds = np.array([*(sep[0] for sep in parts[1::2]), buf[hi]], dtype=np.uint8)
    values = np.array([float(t.decode()) for t in parts[0::2]], dtype=np.float64)
    return values.astype(np.float32), kinds


def _parse(buf: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        return _parse_block(buf, lo, hi)
    except _Irregular:
        return _parse_general(buf, lo, hi)


def _is_separator(chars: np.ndarray) -> np.ndarray:
    """Which bytes are a space, a tab or a newline."""
    return (chars == 32) | (chars == 9) | (chars == 10)


def parse_padded(
    buf: np.ndarray, lo: int, hi: int, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Parse the numbers in uint8 `buf[lo:hi]` into float32 (ValueError on a bad token).

    `buf` holds PAD space bytes before `lo` and after `hi`. Returns the values and, per token, the separator
    byte that follows it (the last token's is `buf[hi]`). The text is cut at separators into blocks of about
    `BLOCK_BYTES`, parsed by a thread pool (numpy releases the GIL in the heavy steps).
    """
    cuts = [lo]
    while hi - cuts[-1] > BLOCK_BYTES:
        window = buf[cuts[-1] + BLOCK_BYTES : hi]
        found = np.flatnonzero(_is_separator(window[:4096]))
        if found.size == 0:
            found = np.flatnonzero(_is_separator(window))
        if found.size == 0:
            break
        cuts.append(cuts[-1] + BLOCK_BYTES + int(found[0]) + 1)
    blocks = [(a, b - 1) for a, b in itertools.pairwise(cuts)] + [(cuts[-1], hi)]
    if len(blocks) == 1:
        return _parse(buf, lo, hi)
    with ThreadPoolExecutor(threads or min(os.cpu_count() or 1, 8)) as pool:
        parts = list(pool.map(lambda block: _parse(buf, *block), blocks))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def padded(raw: bytes) -> tuple[np.ndarray, int, int]:
    """`raw` as a uint8 array with PAD spaces either side, and the bounds of `raw` in it."""
    buf = np.full(len(raw) + 2 * PAD, 32, dtype=np.uint8)
    buf[PAD : PAD + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return buf, PAD, PAD + len(raw)


def read_padded(path: Path) -> tuple[np.ndarray, int, int]:
    """A file's bytes read straight into a padded uint8 array (no copy), and their bounds in it."""
    size = path.stat().st_size
    buf = np.empty(size + 2 * PAD, dtype=np.uint8)
    with path.open("rb") as fh:
        got = fh.readinto(memoryview(buf)[PAD : PAD + size])
    buf[:PAD] = 32
    buf[PAD + got :] = 32
    return buf, PAD, PAD + got


def parse_floats(text: str, threads: int | None = None) -> np.ndarray:
    """Parse `text` (numbers separated by single spaces) into float32; ValueError on any bad token."""
    if not text.isascii():
        return np.array([float(t) for t in text.split(" ")], dtype=np.float64).astype(np.float32)
    return parse_padded(*padded(text.encode("ascii")), threads=threads)[0]
