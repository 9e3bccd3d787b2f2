"""Convert an official ERNIE-ViL 2.0 Paddle checkpoint into a safetensors checkpoint folder.

python -m ernievil2_train.convert SRC.pdparams OUT_DIR [--vision-heads N] [--text-heads N]
    [--text-config ernie_config.base.json] [--vocab VOCAB]
"""

from __future__ import annotations

import argparse
import sys

from ernievil2_train.arguments import nonempty_path
from ernievil2_train.checkpoints import CheckpointError, load_pdparams
from ernievil2_train.checkpoints.io import check_output, save_with_vocab
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ernievil2_train.convert",
        description="Convert a Paddle .pdparams file (read without Paddle) to safetensors + config.json.",
    )
    parser.add_argument("src", type=nonempty_path, help="official .pdparams file")
    parser.add_argument("out_dir", type=nonempty_path, help="output checkpoint folder")
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
    parser.add_argument(
        "--vocab", type=nonempty_path, default=None, help="vocab.txt to copy into the checkpoint folder"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_output(args.src, args.out_dir)
        model = load_pdparams(args.src, args.vision_heads, args.text_heads, args.text_config)
        out, vocab = save_with_vocab(model, args.out_dir, args.vocab)
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
    print(f"wrote {out} ({vocab})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main, "python -m ernievil2_train.convert"))
