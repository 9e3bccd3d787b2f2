"""The command line every recipe shares: writer options, their argparse types, and how a run ends (a
one-line error with exit status 2; Ctrl-C or SIGTERM with one line and 130 or 143)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from data_recipes.pool import WorkerDied
from data_recipes.shards import (
    DEFAULT_SHARD_BYTES,
    DEFAULT_SHARD_SIZE,
    RecipeError,
    chosen_outputs,
    short_error,
    short_text,
)
from ernievil2_train.arguments import nonempty_path
from ernievil2_train.data.evalset import clip_layout_files


def int_range(low: int = 1, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in `[low, high]` (no upper bound when `high` is None)."""
    wanted = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < low or (high is not None and number > high):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value!r}")
        return number

    return parse


positive_int = int_range(1)


def split_name(value: str) -> str:
    """An argparse type: a split name, used as a file-name prefix (non-empty, no path separators)."""
    bad = not value or value != value.strip() or value in (".", "..") or not value.isprintable()
    if bad or "/" in value or "\\" in value:
        raise argparse.ArgumentTypeError(
            f"must be a non-empty name without path separators or surrounding spaces, got {value!r}"
        )
    return value


def add_writer_args(
    parser: argparse.ArgumentParser, shard_size: int = DEFAULT_SHARD_SIZE, outputs: bool = False
) -> None:
    """The options every recipe shares: output, workers, shard limits (and for importers: split, outputs)."""
    if outputs:
        parser.add_argument(
            "--split",
            type=split_name,
            default="train",
            help="split name: prefix of the files read and written",
        )
        parser.add_argument(
            "--outputs",
            choices=["shards", "evalset", "both"],
            help="write shards, an eval set (Chinese-CLIP layout in OUT/eval) or both "
            "(default: shards for split 'train', both otherwise)",
        )
    parser.add_argument("--out", type=nonempty_path, required=True, help="output folder")
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=max(1, min(8, os.cpu_count() or 1)),
        help="processes for image decoding/encoding (default: CPU count, at most 8)",
    )
    parser.add_argument(
        "--shard-size",
        type=positive_int,
        default=shard_size,
        help=f"samples per shard (default {shard_size})",
    )
    parser.add_argument(
        "--shard-bytes",
        type=positive_int,
        default=DEFAULT_SHARD_BYTES,
        help=f"bytes per shard before rotating (default {DEFAULT_SHARD_BYTES})",
    )


def add_importer_args(parser: argparse.ArgumentParser, input_help: str) -> None:
    """An importer's options: `--input`, `--max-size`, and the writer's (with `--split` and `--outputs`)."""
    parser.add_argument("--input", type=nonempty_path, required=True, help=input_help)
    parser.add_argument(
        "--max-size", type=positive_int, help="re-encode images whose longer side exceeds this"
    )
    add_writer_args(parser, outputs=True)


def check_input(parser: argparse.ArgumentParser, path: Path, file_only: bool = False) -> None:
    """Exit with a one-line error (status 2) when `--input` does not exist, or with `file_only` is no file."""
    if not path.exists():
        fail(parser, f"--input not found: {path}")
    if file_only and not path.is_file():
        fail(parser, f"--input {path} is not a file")


def fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """Exit with status 2 after a one-line error on stderr (no usage text)."""
    print(f"{parser.prog}: error: {short_text(message, limit=1000)}", file=sys.stderr)
    raise SystemExit(2)


def _terminated(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt(signum)


@contextlib.contextmanager
def reported(parser: argparse.ArgumentParser, source: Path | str, out: Path) -> Iterator[None]:
    """Make `out` and run the block; a `RecipeError` or an `OSError` in it ends the run through `fail` (one
    line, status 2), an `OSError` naming its file, else `source`. Ctrl-C or SIGTERM (a `KeyboardInterrupt` in
    the block) ends it with one line and status 130 or 143, once the writers have removed their unfinished
    files. A run that does not finish removes the folders it made, if they stayed empty."""
    previous = signal.signal(signal.SIGTERM, _terminated)
    new = new_folders(out)
    finished = False
    try:
        out.mkdir(parents=True, exist_ok=True)
        yield
        finished = True
    except RecipeError as err:
        fail(parser, str(err))
    except WorkerDied as err:
        fail(parser, f"{err}; what this run did not finish in {out} is as it was")
    except OSError as err:
        fail(parser, f"{err.filename or source}: {short_error(err)}")
    except KeyboardInterrupt as err:
        print(
            f"{parser.prog}: interrupted: no unfinished output was kept; "
            f"what this run did not finish in {out} is as it was",
            file=sys.stderr,
        )
        raise SystemExit(128 + (err.args[0] if err.args else signal.SIGINT)) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not finished:  # a run that wrote nothing leaves no folder of its own behind
            remove_if_empty(new)


def check_writer_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a one-line error, code 2, when `--out` is a file or cannot be made or written. Folders it
    makes to find out are removed again: `reported` makes them for the run."""
    out: Path = args.out
    new = new_folders(out)
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            if out.is_symlink() and not out.exists():
                fail(parser, f"--out {out} is a symbolic link to {os.readlink(out)}, which does not exist")
            fail(parser, f"--out {out} is a file, not a folder")
        except OSError as err:
            fail(parser, f"--out {out} cannot be created: {short_error(err)}")
        if not out.is_dir():
            fail(parser, f"--out {out} is not a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            fail(parser, f"--out {out} is not writable")
    finally:
        remove_if_empty(new)


def check_inputs_kept(
    parser: argparse.ArgumentParser, args: argparse.Namespace, inputs: Iterable[Path]
) -> None:
    """Exit with a one-line error, code 2, when a file this run writes (per `--out`, `--split`, `--outputs`)
    is one of its `inputs`, as the eval set of a Chinese-CLIP folder written into that folder would be."""
    outputs = chosen_outputs(args)
    written = [args.out / f"{args.split}.json"] if outputs != "evalset" else []
    if outputs != "shards":
        written += clip_layout_files(args.out / "eval", args.split)
    read = {path.resolve() for path in inputs}
    for path in written:
        if path.resolve() in read:
            fail(parser, f"--out {args.out}: the run would write {path}, which it reads; choose other --out")


def new_folders(out: Path) -> list[Path]:
    """`out` and those of its parents that do not exist yet, deepest first."""
    return [folder for folder in (out, *out.parents) if not folder.exists() and not folder.is_symlink()]


def remove_if_empty(folders: list[Path]) -> None:
    """Remove each of `folders` (deepest first) that is empty; leave the others."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()
