"""The random generators' states a checkpoint keeps, per rank, so that a resumed run draws the dropout masks
the uninterrupted run drew."""

from __future__ import annotations

import random
from typing import Any

import torch

from ernievil2_train.distributed import world

GeneratorStates = dict[str, Any]  # Python's, torch's and the CUDA device's generator states


def rng_state(device: torch.device) -> GeneratorStates:
    """The states of Python's, torch's and (on a CUDA device) that device's random generators."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def rng_states_of_ranks(device: torch.device) -> list[GeneratorStates]:
    """Every rank's `rng_state`, in rank order (every rank saves a checkpoint together); they differ from the
    start of training (`part_ranks`)."""
    rank_state = rng_state(device)
    _, size = world()
    if size == 1:
        return [rank_state]
    states: list[Any] = [None] * size
    torch.distributed.all_gather_object(states, rank_state)
    return states


def part_ranks(rank: int) -> None:
    """Give each rank's torch generators (dropout, drop-path) a stream of its own: every rank was seeded
    alike, and equal draws would give row i of every rank's batch the same masks. Rank 0 keeps its stream
    (a single-process run draws as before); the others' follows from it, so runs stay reproducible."""
    if rank > 0:
        base = int(torch.randint(0, 2**62, (1,)))  # the same number on every rank: seeded alike
        torch.manual_seed(base + rank)


def own_rng_state(
    saved: list[GeneratorStates] | GeneratorStates, rank: int, size: int
) -> GeneratorStates | None:
    """This rank's states from a checkpoint's `rng_states_of_ranks`; None when it was saved by another number
    of ranks (the run is then not resumed exactly anyway). A checkpoint of one state (older ones) gives it."""
    if isinstance(saved, dict):
        return saved
    return saved[rank] if len(saved) == size else None


def set_rng_state(state: GeneratorStates, device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
