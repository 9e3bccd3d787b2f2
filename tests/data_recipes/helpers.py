"""Test helpers for the data recipes: small real images and a plain-tarfile shard reader."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]


def image_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (24, 16), fmt: str = "JPEG") -> bytes:
    """A small solid-colour image encoded in `fmt`."""
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format=fmt)
    return out.getvalue()


def read_shards(folder: Path, split: str) -> list[dict]:
    """All samples of `{split}-*.tar` in `folder`, in order: {"key", "ext", "image", "txt", "json"}."""
    samples: list[dict] = []
    for shard in sorted(folder.glob(f"{split}-*.tar")):
        grouped: dict[str, dict] = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                grouped.setdefault(key, {"key": key})[ext] = tar.extractfile(member).read()
        for key, fields in grouped.items():
            ext = next(e for e in ("jpg", "png", "webp") if e in fields)
            samples.append(
                {
                    "key": key,
                    "ext": ext,
                    "image": fields[ext],
                    "txt": fields["txt"].decode("utf-8"),
                    "json": json.loads(fields["json"]),
                }
            )
    return samples


def run_recipe(name: str, *args: str) -> subprocess.CompletedProcess:
    """Run `python -m data_recipes.<name> ARGS` as a subprocess from the repo root."""
    return subprocess.run(
        [sys.executable, "-m", f"data_recipes.{name}", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The error line of a recipe run that failed on user input: exit status 2, no traceback, and the error as
    the last line of stderr (after any progress bar output)."""
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and lines[-1].startswith("python -m data_recipes.") and ": error: " in lines[-1], lines
    return lines[-1]
