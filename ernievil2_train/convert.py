"""Convert an official ERNIE-ViL 2.0 Paddle checkpoint into a safetensors checkpoint folder.

python -m ernievil2_train.convert SRC.pdparams OUT_DIR [--vision-heads N] [--text-heads N]
    [--text-config ernie_config.base.json] [--vocab VOCAB]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ernievil2_train.checkpoints import CheckpointError, find_vocab, load_pdparams, save_pretrained
from ernievil2_train.checkpoints.io import CONFIG_NAME, VOCAB_NAME, check_output
from ernievil2_train.stopping import run


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def foreign_vocab(out_dir: Path, vocab_size: int) -> str | None:
    """Why the vocab.txt already in `out_dir` belongs to another model than one with `vocab_size` text
    embeddings, or None: the folder's config.json says the model saved beside it had another table size.
    (A vocabulary whose ids do not fit the table at all is removed by `save_pretrained` anyway.)"""
    if find_vocab(out_dir) is None:
        return None
    try:
        earlier = json.loads((out_dir / CONFIG_NAME).read_text(encoding="utf-8"))["text"]["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no earlier checkpoint here: the vocabulary was put beside it on purpose
    if earlier == vocab_size:
        return None
    return f"it came with a model of {earlier} text embeddings, this one has {vocab_size}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ernievil2_train.convert",
        description="Convert a Paddle .pdparams file (read without Paddle) to safetensors + config.json.",
    )
    parser.add_argument("src", help="official .pdparams file")
    parser.add_argument("out_dir", help="output checkpoint folder")
    parser.add_argument(
        "--vision-heads",
        type=positive_int,
        default=None,
        help="ViT attention heads (default: width/64, else the nearest count dividing the width)",
    )
    parser.add_argument(
        "--text-heads", type=positive_int, default=None,
        help="ERNIE attention heads (default: text width/64, else the nearest count dividing the width)",
    )
    parser.add_argument(
        "--text-config", default=None,
        help="the release's ERNIE config (ernie_config.base.json): text heads and dropout rates from it, its "
        "sizes checked against the weights",
    )
    parser.add_argument("--vocab", default=None, help="vocab.txt to copy into the checkpoint folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_output(args.src, args.out_dir)
        model = load_pdparams(args.src, args.vision_heads, args.text_heads, args.text_config)
        foreign = None if args.vocab else foreign_vocab(Path(args.out_dir), model.config.text.vocab_size)
        out = save_pretrained(model, args.out_dir, vocab_file=args.vocab)
        if foreign:
            (out / VOCAB_NAME).unlink()
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    v, t = model.config.vision, model.config.text
    params = sum(p.numel() for p in model.parameters())
    guess = " (a guess: the weights do not hold it; {} sets it)"
    vision_guess = guess.format("--vision-heads") if args.vision_heads is None else ""
    text_given = args.text_heads is not None or args.text_config is not None
    text_guess = "" if text_given else guess.format("--text-heads or --text-config")
    print(f"vision: ViT {v.image_size}px/{v.patch_size}, width {v.width}, {v.layers} layers, "
          f"{v.heads} heads{vision_guess}")
    print(
        f"text:   ERNIE vocab {t.vocab_size}, width {t.width}, {t.layers} layers, {t.heads} "
        f"heads{text_guess}, ffn {t.intermediate_size}, {t.max_position_embeddings} positions"
    )
    print(f"logit scale exp({model.logit_scale.item():.6g}); {params / 1e6:.2f}M parameters")
    if foreign:
        vocab = f"removed the vocab.txt it held: {foreign}, another model's; copy this one's in with --vocab"
    elif args.vocab:
        vocab = "with vocab.txt"
    else:
        vocab = "kept its vocab.txt" if find_vocab(out) else "no vocab.txt"
    print(f"wrote {out} ({vocab})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main, "python -m ernievil2_train.convert"))
