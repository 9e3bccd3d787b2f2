"""The recipes' shared command line: the `--out` folder a run makes, and what a run that fails leaves."""

from __future__ import annotations

import base64

from tests.data_recipes.helpers import error_line, image_bytes, run_recipe

RED = image_bytes((250, 0, 0))


def test_a_run_that_fails_leaves_no_folder_it_made(tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    out = tmp_path / "new" / "deeper" / "out"
    proc = run_recipe("tsv", "--input", str(empty), "--out", str(out), "--workers", "1")
    assert error_line(proc).endswith(f"error: nothing written: {empty} holds no samples")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.tsv"]
    existing = tmp_path / "existing"
    existing.mkdir()
    proc = run_recipe("tsv", "--input", str(empty), "--out", str(existing), "--workers", "1")
    assert proc.returncode == 2 and existing.is_dir()  # a folder that was there stays


def test_a_run_that_finishes_makes_its_folders(tmp_path):
    rows = tmp_path / "pairs.tsv"
    rows.write_text(f"{base64.b64encode(RED).decode()}\t红色的图\n", encoding="utf-8")
    out = tmp_path / "new" / "out"
    proc = run_recipe("tsv", "--input", str(rows), "--out", str(out), "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar", "train.json"]
