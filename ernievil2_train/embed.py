"""Embed a 3-column TSV (`text \\t image_id \\t base64 image`) into the official `run_infer` output format.

    python -m ernievil2_train.embed --checkpoint DIR --input FILE.tsv --output FILE

Each written line is `text_vec \\t image_vec \\t 1`: L2-normalized float32 vectors, space-joined as numpy
prints float32 values. Rows with a wrong column count or an undecodable image are skipped and reported.
The output file is written only when at least one row was embedded.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import os
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ernievil2_train.arguments import nonempty_path
from ernievil2_train.checkpoints import CheckpointError
from ernievil2_train.devices import resolve_device
from ernievil2_train.loading import load_checkpoint, load_tokenizer, resolve_vocab
from ernievil2_train.models import DualEncoder, trim_padding
from ernievil2_train.stopping import run
from ernievil2_train.text import ErnieTokenizer
from ernievil2_train.text.tokenizer import OFFICIAL_MAX_LEN
from ernievil2_train.vision import ImageDecodeError, ImageTooLarge, eval_transform, quiet_opencv

MAX_EXAMPLES = 10


@dataclass
class Skipped:
    """Rows left out, by reason, with the first few by line number (a batch's undecodable images are found
    after the malformed lines read with it)."""

    counts: Counter = field(default_factory=Counter)
    examples: list[tuple[int, str]] = field(default_factory=list)

    def add(self, line_no: int, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        self.examples.append((line_no, f"line {line_no}: {reason}" + (f" ({detail})" if detail else "")))
        self.examples = sorted(self.examples)[:MAX_EXAMPLES]

    def summary(self) -> str:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in self.counts.most_common())
        first = "; ".join(text for _, text in self.examples)
        return f"skipped {self.counts.total()} row(s) [{reasons}]; first: {first}"


@dataclass
class Row:
    line_no: int
    text: str
    image: bytes


def read_rows(path: Path, skipped: Skipped, progress: tqdm) -> Iterator[Row]:
    """Well-formed rows of the TSV; blank lines are ignored, malformed ones recorded in `skipped`."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            progress.update(len(raw))
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                skipped.add(line_no, "not UTF-8")
                continue
            if "\t" not in line and not line.strip():  # blank; a row of empty columns is malformed
                continue
            columns = line.split("\t")
            if len(columns) != 3:
                skipped.add(line_no, "wrong column count", f"{len(columns)} instead of 3")
                continue
            try:
                image = base64.b64decode(columns[2], validate=False)
            except (binascii.Error, ValueError):
                skipped.add(line_no, "invalid base64")
                continue
            yield Row(line_no, columns[0], image)


def format_vector(vector: np.ndarray) -> str:
    """`' '.join(str(x) for x in float32_vector)`, as the official `run_infer.py` writes."""
    return " ".join(map(str, vector.astype(np.float32, copy=False)))


class Embedder:
    """Batched text + image encoding into normalized float32 numpy arrays."""

    def __init__(self, model: DualEncoder, tokenizer: ErnieTokenizer, device: torch.device, bf16: bool):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.bf16 = bf16

    @torch.inference_mode()
    def __call__(self, texts: list[str], images: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        ids = trim_padding(self.tokenizer(texts)["input_ids"]).to(self.device)
        pixels = torch.stack(images).to(self.device)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with autocast:
            text = self.model.encode_text(ids)
            image = self.model.encode_image(pixels)
        return tuple(F.normalize(x.float(), dim=-1, eps=1e-12).cpu().numpy() for x in (text, image))


def embed_file(
    embedder: Embedder,
    transform: Callable[[bytes], torch.Tensor],
    src: Path,
    out: TextIO | _Output,
    batch_size: int,
    workers: int,
) -> tuple[int, Skipped]:
    """Embed every good row of `src` into `out` (images through `transform`); returns (rows written, skipped
    rows)."""

    def decode(row: Row) -> torch.Tensor | ImageDecodeError:
        try:
            return transform(row.image)
        except ImageDecodeError as err:
            return err

    skipped = Skipped()
    written = 0
    size = src.stat().st_size
    with (
        tqdm(total=size, unit="B", unit_scale=True, desc="embed", file=sys.stderr) as progress,
        ThreadPoolExecutor(max_workers=workers) as pool,
    ):
        rows = read_rows(src, skipped, progress)
        while batch := list(islice(rows, batch_size)):
            texts, images = [], []
            for row, image in zip(batch, pool.map(decode, batch), strict=True):
                if isinstance(image, ImageDecodeError):
                    reason = "image too large" if isinstance(image, ImageTooLarge) else "undecodable image"
                    skipped.add(row.line_no, reason, str(image))
                    continue
                texts.append(row.text)
                images.append(image)
            if not texts:
                continue
            text_vecs, image_vecs = embedder(texts, images)
            out.writelines(
                f"{format_vector(t)}\t{format_vector(i)}\t1\n"
                for t, i in zip(text_vecs, image_vecs, strict=True)
            )
            out.flush()
            written += len(texts)
            progress.set_postfix(rows=written, skipped=skipped.counts.total())
    return written, skipped


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ernievil2_train.embed", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--checkpoint",
        type=nonempty_path,
        required=True,
        help="checkpoint folder (model.safetensors + config.json)",
    )
    parser.add_argument(
        "--input", type=nonempty_path, required=True, help="TSV file: text \\t image_id \\t base64 image"
    )
    parser.add_argument("--output", type=nonempty_path, required=True, help="embeddings file to write")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto: bf16 on a CUDA GPU, else fp32",
    )
    parser.add_argument(
        "--vocab",
        type=nonempty_path,
        default=None,
        help="vocab.txt, for a checkpoint folder without one (else its own is used)",
    )
    parser.add_argument(
        "--max-len",
        type=int,
        default=None,
        help=f"text length incl. [CLS]/[SEP] (default: the official {OFFICIAL_MAX_LEN}, or the checkpoint's "
        "text positions when it has fewer)",
    )
    parser.add_argument(
        "--short-size",
        type=int,
        default=None,
        help="scale the short side to this before the center crop (default: the model's image size)",
    )
    parser.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="image decode threads"
    )
    return parser


def _check_paths(src: Path, out: Path, checkpoint: Path, vocab: Path | None) -> None:
    """--input must be a file; --output a file path in an existing folder, none of the files read."""
    if src.is_dir():
        raise ValueError(f"--input {src}: is a folder, not a file")
    if not src.exists():
        raise ValueError(f"--input {src}: no such file")
    if not src.is_file():
        raise ValueError(f"--input {src}: not a regular file (a pipe?); embed reads a file on disk")
    if out.is_dir():
        raise ValueError(f"--output {out}: is a folder, not a file")
    target = _destination(out)
    if not target.parent.is_dir():
        raise ValueError(f"--output {out}: folder {target.parent} does not exist")
    read = [("--input", src), ("--vocab", vocab)]
    if checkpoint.is_dir():
        read += [("--checkpoint", file) for file in checkpoint.iterdir() if file.is_file()]
    for flag, file in read:
        if file is not None and _same_file(out, file):
            raise ValueError(f"--output {out} is the same file as {flag} {file} (it would be overwritten)")


def _destination(out: Path) -> Path:
    """The file --output's rows replace: the one a symbolic link names (the link stays a link); a file
    without any write permission is refused rather than replaced."""
    target = out.resolve() if out.is_symlink() else out
    if target.is_file() and (not target.stat().st_mode & 0o222 or not os.access(target, os.W_OK)):
        raise ValueError(f"--output {out}: is read-only")
    return target


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def _setup(args: argparse.Namespace) -> tuple[Embedder, DualEncoder]:
    """Validate the arguments and load the checkpoint and tokenizer (user errors raise ValueError)."""
    for flag, value in (("--batch-size", args.batch_size), ("--workers", args.workers)):
        if value < 1:
            raise ValueError(f"{flag} must be positive, got {value}")
    _check_paths(Path(args.input), Path(args.output), Path(args.checkpoint), args.vocab and Path(args.vocab))
    device = resolve_device(args.device)
    model = load_checkpoint(args.checkpoint, device)
    tokenizer = load_tokenizer(resolve_vocab(args.checkpoint, args.vocab), model, args.max_len)
    bf16 = args.precision == "bf16" or (
        args.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    return Embedder(model, tokenizer, device, bf16), model


def _embed_to_output(
    args: argparse.Namespace, embedder: Embedder, transform: Callable[[bytes], torch.Tensor]
) -> tuple[int, Skipped]:
    """Embed into a temporary file beside --output, moved there only when at least one row was written; an
    --output that is not a regular file (`/dev/null`, a named pipe) is written as it is, never replaced."""
    src, out = Path(args.input), Path(args.output)
    target = _destination(out)
    direct = target.exists() and not target.is_file()
    staged = target if direct else target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        try:
            fh = staged.open("w" if direct else "x", encoding="utf-8")
        except OSError as err:
            raise ValueError(f"--output {out}: cannot write into {target.parent} ({err.strerror})") from None
        try:
            written, skipped = embed_file(embedder, transform, src, _Output(fh, out), args.batch_size,
                                          args.workers)
        finally:
            with _naming_output(out):
                fh.close()
        if not written:
            why = f"no row could be embedded; {skipped.summary()}" if skipped.counts else "no rows in it"
            raise ValueError(f"--input {src}: nothing written to --output ({why})")
        if not direct:
            with _naming_output(out):
                if target.exists():  # the rows replace the file's, its permissions stay
                    shutil.copymode(target, staged)
                os.replace(staged, target)
    finally:
        if not direct:
            with contextlib.suppress(OSError):
                staged.unlink(missing_ok=True)
    return written, skipped


class _Output:
    """The temporary output file, whose failed writes name --output (a failed read of --input does not)."""

    def __init__(self, fh: TextIO, out: Path) -> None:
        self.fh, self.out = fh, out

    def writelines(self, lines: Iterable[str]) -> None:
        with _naming_output(self.out):
            self.fh.writelines(lines)

    def flush(self) -> None:
        with _naming_output(self.out):
            self.fh.flush()


@contextlib.contextmanager
def _naming_output(out: Path) -> Iterator[None]:
    """An OSError inside (a write, flush, close or rename of the output) becomes a ValueError naming it."""
    try:
        yield
    except OSError as err:
        raise ValueError(f"--output {out}: cannot write ({err.strerror or err})") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_opencv()  # a corrupt image is one skipped row of the summary, not OpenCV's lines too
    try:
        embedder, model = _setup(args)
        try:
            transform = eval_transform(model.config.vision.image_size, short_size=args.short_size)
        except ValueError as err:
            raise ValueError(f"--short-size: {err}") from None
        written, skipped = _embed_to_output(args, embedder, transform)
    except (CheckpointError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    precision = "bf16" if embedder.bf16 else "fp32"
    print(f"wrote {written} row(s) to {args.output} ({embedder.device.type}, {precision})", file=sys.stderr)
    if skipped.counts:
        print(skipped.summary(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main, "python -m ernievil2_train.embed"))
