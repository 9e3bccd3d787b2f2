"""Export a training checkpoint in the converted format (for `embed`, `evaluate`, `similarity`, fine-tuning).

    python -m ernievil2_train.export outputs/train/RUN/checkpoints/last.ckpt OUT_DIR [--vocab vocab.txt]

The run's best model is exported during training (`RUN/export/`); this exports any other checkpoint. Without
`--vocab`, the run's `export/vocab.txt` is copied when there is one, else the vocabulary the checkpoint's
training data was read with, if that file is still there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ernievil2_train.arguments import nonempty_path
from ernievil2_train.checkpoints import CheckpointError, load_training_checkpoint
from ernievil2_train.checkpoints.io import VOCAB_NAME, check_output, save_with_vocab, training_vocab
from ernievil2_train.stopping import run


def run_vocab(checkpoint: Path) -> Path | None:
    """`RUN/export/vocab.txt` for a checkpoint saved in `RUN/checkpoints/` or `RUN/`, if it exists."""
    for run_dir in (checkpoint.parent.parent, checkpoint.parent):
        vocab = run_dir / "export" / VOCAB_NAME
        if vocab.is_file():
            return vocab
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ernievil2_train.export",
        description="Export a Lightning training checkpoint to safetensors + config.json (+ vocab.txt).",
    )
    parser.add_argument("checkpoint", type=nonempty_path, help="training checkpoint file (.ckpt)")
    parser.add_argument("out_dir", type=nonempty_path, help="output checkpoint folder")
    parser.add_argument(
        "--vocab",
        type=nonempty_path,
        default=None,
        help="vocab.txt to copy (default: the run's export/vocab.txt)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    checkpoint = Path(args.checkpoint)
    try:
        check_output(checkpoint, args.out_dir)
        model = load_training_checkpoint(checkpoint)
        vocab = args.vocab or run_vocab(checkpoint) or training_vocab(checkpoint)
        out, note = save_with_vocab(model, args.out_dir, vocab)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {params / 1e6:.2f}M parameters ({note})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main, "python -m ernievil2_train.export"))
