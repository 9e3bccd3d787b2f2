"""argparse types shared by the command-line tools."""

from __future__ import annotations

import argparse
from pathlib import Path


def nonempty_path(value: str) -> Path:
    """A path that is not the empty string (which `Path` would read as the current folder)."""
    if not value:
        raise argparse.ArgumentTypeError("empty path")
    return Path(value)


def nonempty_text(value: str) -> str:
    """A string that is not empty: a location that need not be a local path (a brace pattern, a URL)."""
    if not value:
        raise argparse.ArgumentTypeError("empty value")
    return value
