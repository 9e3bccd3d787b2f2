"""An empty path given to any tool is refused by argparse (it would read as the current folder)."""

from __future__ import annotations

import argparse
import importlib

import pytest

from ernievil2_train.arguments import nonempty_path, nonempty_text

# (tool module, a command line with every other required argument filled in, the option left empty)
CASES = [
    ("convert", ["", "out"], "src"),
    ("convert", ["m.pdparams", ""], "out_dir"),
    ("convert", ["m.pdparams", "out", "--vocab", ""], "--vocab"),
    ("export", ["", "out"], "checkpoint"),
    ("export", ["last.ckpt", "out", "--vocab", ""], "--vocab"),
    ("embed", ["--checkpoint", "", "--input", "a.tsv", "--output", "o"], "--checkpoint"),
    ("embed", ["--checkpoint", "ck", "--input", "", "--output", "o"], "--input"),
    ("embed", ["--checkpoint", "ck", "--input", "a.tsv", "--output", ""], "--output"),
    ("embed", ["--checkpoint", "ck", "--input", "a.tsv", "--output", "o", "--vocab", ""], "--vocab"),
    ("similarity", ["--checkpoint", "", "--images", "a.jpg", "--texts", "t"], "--checkpoint"),
    ("similarity", ["--checkpoint", "ck", "--images", "a.jpg", "", "--texts", "t"], "--images"),
    ("similarity", ["--checkpoint", "ck", "--images", "a.jpg", "--texts", "t", "--vocab", ""], "--vocab"),
    ("evaluate", [""], "embeddings"),
    ("evaluate", ["--image-feats", "", "--text-feats", "t", "--texts", "g"], "--image-feats"),
    ("evaluate", ["--image-feats", "i", "--text-feats", "", "--texts", "g"], "--text-feats"),
    ("evaluate", ["--image-feats", "i", "--text-feats", "t", "--texts", ""], "--texts"),
    ("evaluate", ["--checkpoint", "", "--eval-set", "e"], "--checkpoint"),
    ("evaluate", ["--checkpoint", "ck", "--eval-set", ""], "--eval-set"),
    ("evaluate", ["--checkpoint", "ck", "--eval-set", "e", "--vocab", ""], "--vocab"),
]


@pytest.mark.parametrize(("tool", "argv", "option"), CASES)
def test_an_empty_path_is_refused_by_name(
    tool: str, argv: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = importlib.import_module(f"ernievil2_train.{tool}").build_parser()
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(argv)
    assert stop.value.code == 2
    what = "value" if option == "--eval-set" else "path"  # a pattern need not be a local path
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: argument {option}: empty {what}")


def test_the_types_pass_other_values_through() -> None:
    assert str(nonempty_path("a/b")) == "a/b"
    assert nonempty_text("shards/{0..3}.tar") == "shards/{0..3}.tar"
    for check in (nonempty_path, nonempty_text):
        with pytest.raises(argparse.ArgumentTypeError):
            check("")
