"""The mark a `data_recipes` run leaves on a split while it moves the split's files into place.

A recipe stages a split's files, then renames them into the output folder one by one (the shards, then their
index; or an eval set's two files). `.{split}.publishing` stands in the folder during those renames: a run
killed among them (kill -9, a power loss; Ctrl-C and SIGTERM wait for the renames) leaves it there beside a
mix of old and new files, and readers refuse that split until a later run of the recipe completes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ernievil2_train.data.decode import data_set, is_remote


def publishing_marker(folder: str | Path, split: str) -> Path:
    """The mark of `split` being moved into place in `folder`."""
    return Path(folder) / f".{split}.publishing"


def refuse_half_published(folder: str | Path, split: str, what: str) -> None:
    """A `ValueError` naming `what` (a config key, a path) when `split` of `folder` was left half-moved."""
    marker = publishing_marker(folder, split)
    if marker.exists():
        raise ValueError(f"{what}: split '{split}' of {folder} is a mix of two recipe runs' files: the last "
                         f"run was stopped while moving them into place ({marker.name} is there); run the "
                         "recipe again")


def refuse_half_published_shards(urls: Iterable[str], what: str) -> None:
    """`refuse_half_published` for the split of each local shard in `urls` (its data set: folder and name)."""
    for name in {data_set(url) for url in urls if not is_remote(url)}:
        folder, _, split = name.rpartition("/")
        refuse_half_published(folder, split, what)
