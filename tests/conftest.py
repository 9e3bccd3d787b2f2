"""Shared test fixtures: the Paddle reference set and small helpers."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PADDLE_REF_ENV = "ERNIEVIL2_PADDLE_REF"


def paddle_ref_dir() -> Path:
    """Reference fixtures: `$ERNIEVIL2_PADDLE_REF` or `../shared/fixtures/paddle_ref` beside the repo."""
    return Path(os.environ.get(PADDLE_REF_ENV, REPO_ROOT.parent / "shared" / "fixtures" / "paddle_ref"))


@pytest.fixture(scope="session")
def paddle_ref() -> Path:
    path = paddle_ref_dir()
    if not (path / "outputs.npz").is_file():
        pytest.fail(f"reference fixtures not found at {path}; set {PADDLE_REF_ENV} to their folder")
    return path


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder (`ERNIEVIL2_CACHE`) holding the built-in demo set, built once per test session."""
    from data_recipes.demo import ensure_demo

    cache = tmp_path_factory.mktemp("cache")
    ensure_demo(cache / "demo")
    return cache


def with_ctrl_c() -> None:
    """A `preexec_fn` for a child that a test stops with SIGINT: Ctrl-C back to its default, which Python then
    turns into KeyboardInterrupt. A background job (a CI script's, say) starts with SIGINT ignored, and its
    children would inherit that and never see the signal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
