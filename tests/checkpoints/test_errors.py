"""The shared checkpoint errors: the comparison of saved weights with a model, and short reasons."""

from __future__ import annotations

import json

import pytest
import torch

from ernievil2_train.checkpoints.errors import listing, short_reason, state_mismatch

EXPECTED = {"a.weight": torch.zeros(3, 4), "a.bias": torch.zeros(3), "scale": torch.zeros(1)}


def test_weights_that_fit_have_no_mismatch() -> None:
    assert state_mismatch(EXPECTED, {k: torch.ones_like(v) for k, v in EXPECTED.items()}) == ""


def test_a_zero_dim_temperature_fits_its_one_element_parameter() -> None:
    state = {**EXPECTED, "scale": torch.tensor(2.0)}
    assert state_mismatch(EXPECTED, state) == ""


def test_every_kind_of_difference_is_named() -> None:
    state = {"a.weight": torch.zeros(4, 3), "extra": torch.zeros(2), "scale": "not a tensor"}
    assert state_mismatch(EXPECTED, state) == (
        "missing [a.bias], unexpected [extra], wrong shape [a.weight (4, 3) != (3, 4), scale None != (1,)]"
    )
    assert state_mismatch(EXPECTED, state, extra_ok=True) == (
        "missing [a.bias], wrong shape [a.weight (4, 3) != (3, 4), scale None != (1,)]"
    )


def test_long_lists_are_cut_and_say_how_many_more() -> None:
    names = [f"n{i}" for i in range(11)]
    assert listing(names) == "[n0, n1, n2, n3, n4, n5, n6, n7, ... (+3 more)]"
    assert listing(names[:8]) == "[n0, n1, n2, n3, n4, n5, n6, n7]"
    assert listing([]) == "[]"


def test_a_reason_is_the_first_sentence_of_the_first_line() -> None:
    with pytest.raises(ValueError) as caught:
        json.loads("{")
    assert short_reason(caught.value).startswith("JSONDecodeError: Expecting property name")
    assert short_reason(RuntimeError("first. second\nthird")) == "RuntimeError: first"
    assert short_reason(OSError()) == "OSError"
    assert len(short_reason(RuntimeError("x" * 500), limit=40)) <= len("RuntimeError: ") + 40
