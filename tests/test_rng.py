"""The random generators' states a checkpoint keeps: saved and restored, each rank its own."""

from __future__ import annotations

import random

import torch

from ernievil2_train.rng import own_rng_state, part_ranks, rng_states_of_ranks, set_rng_state


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


def _masks_of_ranks(ranks: int, seed: int) -> list[torch.Tensor]:
    """The dropout mask each of `ranks` processes seeded alike draws first, after `part_ranks`."""
    masks = []
    for rank in range(ranks):
        torch.manual_seed(seed)
        part_ranks(rank)
        masks.append(torch.nn.functional.dropout(torch.ones(64), p=0.5))
    return masks


def test_ranks_seeded_alike_draw_masks_of_their_own_and_rank_0_its_unparted_ones() -> None:
    """Ranks drew the same dropout masks for row i of their batches when their text lengths matched."""
    masks = _masks_of_ranks(3, seed=5)
    assert not any(torch.equal(masks[a], masks[b]) for a, b in ((0, 1), (0, 2), (1, 2)))
    torch.manual_seed(5)
    assert torch.equal(masks[0], torch.nn.functional.dropout(torch.ones(64), p=0.5))  # as a single process
    assert all(torch.equal(a, b) for a, b in zip(masks, _masks_of_ranks(3, seed=5), strict=True))
