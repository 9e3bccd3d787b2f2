"""The random generators' states a checkpoint keeps: saved and restored, each rank its own."""

from __future__ import annotations

import random

import torch

from ernievil2_train.rng import own_rng_state, rng_states_of_ranks, set_rng_state


def test_restoring_the_saved_states_draws_the_same_numbers_again() -> None:
    saved = rng_states_of_ranks(torch.device("cpu"))
    assert len(saved) == 1  # one process
    drawn = (torch.rand(3), random.random())
    set_rng_state(saved[0], torch.device("cpu"))
    again = (torch.rand(3), random.random())
    assert torch.equal(drawn[0], again[0]) and drawn[1] == again[1]


def test_a_rank_takes_its_own_random_state_from_a_checkpoint() -> None:
    """Each rank's own states; none from a checkpoint of another number of ranks; the one state of an older
    checkpoint for every rank."""
    states = [{"torch": torch.tensor([r])} for r in range(2)]
    assert own_rng_state(states, 1, 2) is states[1] and own_rng_state(states, 0, 2) is states[0]
    assert own_rng_state(states, 0, 4) is None
    assert own_rng_state(states[0], 3, 4) is states[0]
