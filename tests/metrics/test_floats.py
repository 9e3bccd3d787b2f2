"""The vectorised float parser is bit-identical to `float()` followed by a float32 cast."""

from __future__ import annotations

import numpy as np
import pytest

from ernievil2_train.metrics import floats
from ernievil2_train.metrics.floats import parse_floats

ODD = ["1.", ".5", "-.5", "+1", "1e5", "1E-3", "inf", "-inf", "nan", "0", "-0", "-0.0", "007", "123.456",
       "999.999999999999", "1000.5", "0.000000000001", "0.0000000000001", "1_0", "12345678901234567890",
       "5", "-12", "0.1234567890123", "-9.99999999999", "3.4028236e38", "1e-50"]


def reference(tokens: list[str]) -> np.ndarray:
    return np.array([np.float32(float(t)) for t in tokens], dtype=np.float32)


def tokens(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    scale = rng.choice([1e-7, 1e-4, 1e-2, 0.05, 1.0, 30.0, 700.0, 1e6], size=n)
    out = [str(x) for x in (rng.standard_normal(n) * scale).astype(np.float32)]
    out += [repr(float(x)) for x in rng.standard_normal(n // 10)] + ODD
    rng.shuffle(out)
    return out


def no_general_reader(*args):
    raise AssertionError("the general reader was used")


@pytest.mark.parametrize("seed", [0, 1])
def test_identical_to_float(seed, monkeypatch):
    monkeypatch.setattr(floats, "_parse_general", no_general_reader)
    toks = tokens(seed, 20000)
    for part in (toks, toks[:1], toks[:7], ["6.5"], ["-7"]):
        got = parse_floats(" ".join(part), threads=1)
        assert np.array_equal(got.view(np.uint32), reference(part).view(np.uint32))


def test_blocks_with_other_bytes_take_the_general_reader(monkeypatch):
    toks = tokens(3, 2000)
    toks[::500] = ["7\r"] * len(toks[::500])  # float() strips the carriage return
    monkeypatch.setattr(floats, "BLOCK_BYTES", 1000)  # most blocks are regular, a few are not
    general, reader = [], floats._parse_general
    monkeypatch.setattr(floats, "_parse_general", lambda *a: general.append(a) or reader(*a))
    text = " ".join(toks)
    assert np.array_equal(parse_floats(text, threads=2).view(np.uint32), reference(toks).view(np.uint32))
    assert 0 < len(general) < len(text) // 1000 / 2


@pytest.mark.parametrize("text", [b"1.5 -2\t3\n4 +5\t6", b"1.5 -2\t3\r\n4 +5\t6"])  # vectorised, general
def test_separator_after_each_token(text):
    values, kinds = floats.parse_padded(*floats.padded(text))
    assert values.tolist() == [1.5, -2.0, 3.0, 4.0, 5.0, 6.0]
    assert kinds.tolist() == [32, 9, 10, 32, 9, 32]  # the last one is the padding after the text


def test_threads_give_the_same_result(monkeypatch):
    monkeypatch.setattr(floats, "BLOCK_BYTES", 100)
    toks = tokens(2, 5000)
    text = " ".join(toks)
    assert np.array_equal(parse_floats(text, threads=3).view(np.uint32), reference(toks).view(np.uint32))


def test_unicode_digits_follow_float():
    assert parse_floats("１ 2").tolist() == [1.0, 2.0]


MALFORMED = ["1 2  3", "1 x 2", "1 2 -", "1 .", "1 1-2", "1 1..2", "--1", "1.2.3 4", "", "1 "]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_tokens_raise(text):
    with pytest.raises(ValueError):
        parse_floats(text)
