"""Ctrl-C and SIGTERM: a recipe run ends at once with one line, keeps nothing of its own, and leaves the
earlier output as it was."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from tests.data_recipes.helpers import REPO_ROOT, run_recipe

# Runs the recipe with Ctrl-C on, even when the tests run with it ignored (as background jobs do).
_RECIPE_WITH_CTRL_C = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, '-m', 'data_recipes.tsv', *sys.argv[1:]])"
)


def _noise_jpeg(size: tuple[int, int] = (400, 300)) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


@pytest.mark.parametrize(("workers", "signum"), [(2, signal.SIGINT), (1, signal.SIGINT), (2, signal.SIGTERM)])
def test_an_interrupted_run_ends_with_one_line_and_keeps_nothing(tmp_path, workers, signum):
    (tmp_path / "a.jpg").write_bytes(_noise_jpeg())
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps({"image": "a.jpg", "caption": "earlier"}) + "\n")
    out = tmp_path / "out"
    assert run_recipe("tsv", "--input", str(small), "--out", str(out), "--workers", "1").returncode == 0
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    many = tmp_path / "many.jsonl"
    rows = [json.dumps({"image": "a.jpg", "caption": "x", "image_id": i}) + "\n" for i in range(5000)]
    many.write_text("".join(rows))
    args = ["--input", str(many), "--out", str(out), "--workers", str(workers), "--shard-size", "10"]
    proc = subprocess.Popen(
        [sys.executable, "-c", _RECIPE_WITH_CTRL_C, *args, "--max-size", "64"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, which a terminal's Ctrl-C reaches, workers included
    )
    try:
        deadline = time.monotonic() + 60
        while not (out / ".train.partial" / "train-000001.tar").exists():  # the first shard is finished
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        os.killpg(proc.pid, signum)
        stdout, stderr = (text.decode() for text in proc.communicate(timeout=20))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signum, stderr
    lines = [line for line in stderr.split("\n") if line and "\r" not in line]  # the bar's updates hold \r
    assert lines == [
        "python -m data_recipes.tsv: interrupted: no unfinished output was kept; "
        f"what this run did not finish in {out} is as it was"
    ], stderr
    assert stdout == "" and "Traceback" not in stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier
