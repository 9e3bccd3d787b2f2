"""Print the image x text similarity of a checkpoint on a few images and captions.

    python -m ernievil2_train.similarity --checkpoint DIR --images A.jpg B.jpg --texts "一只猫" "a dog"

Each row is one image; its entries are the softmax over the texts of `exp(logit_scale) * cosine`
(`--cosine` also prints the raw cosine similarities).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ernievil2_train.arguments import nonempty_path
from ernievil2_train.checkpoints import CheckpointError
from ernievil2_train.devices import resolve_device
from ernievil2_train.loading import load_checkpoint, load_tokenizer, resolve_vocab
from ernievil2_train.models import DualEncoder, trim_padding
from ernievil2_train.stopping import run
from ernievil2_train.text import ErnieTokenizer
from ernievil2_train.vision import ImageDecodeError, eval_transform, quiet_opencv


@torch.inference_mode()
def similarity(
    model: DualEncoder,
    tokenizer: ErnieTokenizer,
    images: list[Path],
    texts: list[str],
    transform: Callable[[Path], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities [I, T] softmaxed over texts, cosine similarities [I, T]); images read by `transform`
    (default: the official eval transform at the model's image size)."""
    device = model.logit_scale.device
    transform = transform or eval_transform(model.config.vision.image_size)
    pixels = torch.stack([_pixels(transform, path) for path in images]).to(device)
    ids = trim_padding(tokenizer(texts)["input_ids"]).to(device)
    cosine = model.encode_image(pixels, normalize=True) @ model.encode_text(ids, normalize=True).T
    probs = F.softmax(model.logit_scale.exp() * cosine, dim=-1)
    return probs.cpu(), cosine.cpu()


def _pixels(transform: Callable[[Path], torch.Tensor], path: Path) -> torch.Tensor:
    """The transformed image; decode errors name the file."""
    try:
        return transform(path)
    except ImageDecodeError as err:
        raise ImageDecodeError(f"{path}: cannot decode image: {err}") from None


def render(title: str, values: torch.Tensor, images: list[Path], texts: list[str]) -> Table:
    table = Table(title=title)
    table.add_column("image \\ text")
    for text in texts:  # as Text, not markup: a caption or file name with [brackets] shows as it is
        table.add_column(Text(text if len(text) <= 24 else text[:23] + "…"), justify="right")
    for path, row in zip(images, values.tolist(), strict=True):
        table.add_row(Text(path.name), *(f"{v:.4f}" for v in row))
    return table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ernievil2_train.similarity", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--checkpoint",
        type=nonempty_path,
        required=True,
        help="checkpoint folder (model.safetensors + config.json)",
    )
    parser.add_argument("--images", nargs="+", required=True, type=nonempty_path, help="image files")
    parser.add_argument("--texts", nargs="+", required=True, help="captions")
    parser.add_argument(
        "--vocab",
        type=nonempty_path,
        default=None,
        help="vocab.txt, for a checkpoint folder without one (else its own is used)",
    )
    parser.add_argument(
        "--short-size",
        type=int,
        default=None,
        help="scale the short side to this before the center crop (default: the model's image size)",
    )
    parser.add_argument("--cosine", action="store_true", help="also print the raw cosine similarities")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    return parser


def _check_images(images: list[Path]) -> None:
    """Every --images path must be a file."""
    folders = [str(p) for p in images if p.is_dir()]
    if folders:
        raise ValueError(f"--images: {', '.join(folders)}: folder(s), not image files")
    missing = [str(p) for p in images if not p.exists()]
    if missing:
        raise ValueError(f"image file(s) not found: {', '.join(missing)}")
    special = [str(p) for p in images if not p.is_file()]
    if special:
        raise ValueError(f"--images: {', '.join(special)}: not regular files (pipes?); images are read from "
                         "disk")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_opencv()  # an image that does not decode is one line of ours, not OpenCV's lines too
    try:
        device = resolve_device(args.device)
        _check_images(args.images)
        model = load_checkpoint(args.checkpoint, device)
        tokenizer = load_tokenizer(resolve_vocab(args.checkpoint, args.vocab), model)
        try:
            transform = eval_transform(model.config.vision.image_size, short_size=args.short_size)
        except ValueError as err:
            raise ValueError(f"--short-size: {err}") from None
        probs, cosine = similarity(model, tokenizer, args.images, args.texts, transform)
    except (CheckpointError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    console = Console(width=max(100, 20 + 26 * len(args.texts)))
    console.print(render("probability (softmax over texts)", probs, args.images, args.texts))
    if args.cosine:
        console.print(render("cosine similarity", cosine, args.images, args.texts))
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main, "python -m ernievil2_train.similarity"))
