"""Image-text retrieval evaluation CLI.

    python -m ernievil2_train.evaluate EMBEDDINGS.txt [--json]
    python -m ernievil2_train.evaluate --image-feats X.img_feat.jsonl --text-feats Y.txt_feat.jsonl \\
        --texts valid_texts.jsonl
    python -m ernievil2_train.evaluate --checkpoint DIR --eval-set PATH [--split valid]

An embeddings file (official `run_infer` format) is scored with the official row-paired `ernie` protocol by
default and prints the official `eval_retri.py` table; feature files and checkpoints use `any_positive`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ernievil2_train.arguments import nonempty_path, nonempty_text
from ernievil2_train.devices import resolve_device
from ernievil2_train.metrics.files import (
    EvalInputError,
    read_embeddings_file,
    read_feature_jsonl,
    read_ground_truth,
)
from ernievil2_train.metrics.retrieval import DEFAULT_CHUNK_SIZE, KS, any_positive, ernie_protocol
from ernievil2_train.stopping import run
from ernievil2_train.text.tokenizer import OFFICIAL_MAX_LEN

PROTOCOLS = ("ernie", "any_positive")


def format_table(metrics: dict[str, float]) -> str:
    """The official `eval_retri.py` table (github-style pipes, values x100 with 2 decimals)."""
    header = ["Name", "R@1", "R@5", "R@10", "meanRecall"]
    keys = [f"r@{k}" for k in KS] + ["mean_recall"]
    t2i = [metrics[f"t2i/{k}"] for k in keys]
    i2t = [metrics[f"i2t/{k}"] for k in keys]
    mean = [(a + b) / 2 for a, b in zip(t2i, i2t, strict=True)]
    rows = [[name] + [f"{v * 100:.2f}" for v in values]
            for name, values in (("Text2Image", t2i), ("Image2Text", i2t), ("MeanRecall", mean))]
    # Like tabulate: a column is at least its header plus 2 wide; names left-aligned, numbers right-aligned.
    widths = [max(len(header[c]) + 2, *(len(r[c]) for r in rows)) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [cells[0].ljust(widths[0])]
        padded += [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "| " + " | ".join(padded) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), separator, *(line(r) for r in rows)]) + "\n"


def _dedupe_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique rows in first-seen order and, per input row, the index of its unique row."""
    _, first, inverse = np.unique(vectors, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return vectors[first[order]], rank[inverse.reshape(-1)]


def _pooled_any_positive(text: np.ndarray, image: np.ndarray, **kw) -> tuple[dict[str, float], int, int]:
    """any_positive on a row-paired file, where identical vectors are the same text / image; with the
    numbers of distinct texts and images ranked."""
    texts, text_of_row = _dedupe_rows(text)
    images, image_of_row = _dedupe_rows(image)
    positives: list[set[int]] = [set() for _ in range(len(texts))]
    for t, i in zip(text_of_row.tolist(), image_of_row.tolist(), strict=True):
        positives[t].add(i)
    return any_positive(texts, images, [sorted(p) for p in positives], **kw), len(texts), len(images)


NON_FINITE = "has NaN or infinite values"
ALL_ZEROS = "is all zeros (not an embedding)"
NORM_RANGE = (1e-12, 1e12)  # vector lengths whose float32 scores neither overflow nor underflow
OUT_OF_RANGE = ("has length {norm:.3g}, beyond what float32 scores resolve (1e-12 to 1e12; embeddings "
                "are usually L2-normalized)")


def _first_invalid(vectors: np.ndarray, chunk: int = 1 << 14) -> tuple[int, str] | None:
    """(index, reason) of the first row that has a NaN or infinite value, is all zeros, or is too long or too
    short to be scored in float32 (None if none).

    A zero vector scores 0 against everything, so under the strict-greater rank rule it ties with every
    candidate and would count as a hit: it is refused like a non-finite one. So are vectors whose float32
    scores (the official scorer's type) would overflow to infinity or underflow to ties of 0.
    """
    low, high = NORM_RANGE
    for start in range(0, len(vectors), chunk):
        block = vectors[start : start + chunk]
        finite = np.isfinite(block).all(axis=1)
        norms = np.linalg.norm(np.where(finite[:, None], block, 0).astype(np.float64), axis=1)
        rows = np.flatnonzero(~finite | (norms < low) | (norms > high))  # a zero vector's norm < low
        if rows.size:
            row = int(rows[0])
            if not finite[row]:
                return start + row, NON_FINITE
            if norms[row] == 0:
                return start + row, ALL_ZEROS
            return start + row, OUT_OF_RANGE.format(norm=norms[row])
    return None


def _from_embeddings(args: argparse.Namespace) -> tuple[dict[str, float], int, int]:
    text, image = read_embeddings_file(args.embeddings)
    for column, what, vectors in ((1, "text", text), (2, "image", image)):
        invalid = _first_invalid(vectors)
        if invalid is not None:
            row, reason = invalid
            raise EvalInputError(f"{args.embeddings}:{row + 1}: {what} vector (column {column}) {reason}")
    kw = {"chunk_size": args.chunk_size, "device": args.device}
    if args.protocol == "any_positive":
        return _pooled_any_positive(text, image, **kw)
    return ernie_protocol(text, image, **kw), len(text), len(image)


def _from_features(args: argparse.Namespace) -> tuple[dict[str, float], int, int]:
    images = read_feature_jsonl(args.image_feats, "image_id")
    texts = read_feature_jsonl(args.text_feats, "text_id")
    if images.vectors.shape[1] != texts.vectors.shape[1]:
        raise EvalInputError(
            f"dimension mismatch: {args.text_feats} has {texts.vectors.shape[1]}-d text features, "
            f"{args.image_feats} has {images.vectors.shape[1]}-d image features"
        )
    for features, key in ((images, "image_id"), (texts, "text_id")):
        invalid = _first_invalid(features.vectors)
        if invalid is not None:
            row, reason = invalid
            raise EvalInputError(f"{features.path}: the feature of {key} {features.ids[row]!r} {reason}")
    text_rows, positives = read_ground_truth(args.texts, images, texts)
    metrics = any_positive(texts.vectors[text_rows], images.vectors, positives,
                           chunk_size=args.chunk_size, device=args.device)
    return metrics, len(text_rows), len(images.ids)


def _from_checkpoint(args: argparse.Namespace) -> tuple[dict[str, float], int, int]:
    from ernievil2_train.data.evalset import load_evalset
    from ernievil2_train.loading import load_checkpoint, load_tokenizer, resolve_vocab
    from ernievil2_train.metrics.encode import drop_images, encode_images, encode_texts
    from ernievil2_train.vision import eval_transform, quiet_opencv

    quiet_opencv()  # an image that does not decode is counted and reported, without OpenCV's lines
    checkpoint, device = Path(args.checkpoint), args.device
    model = load_checkpoint(checkpoint, device)
    tokenizer = load_tokenizer(resolve_vocab(checkpoint, args.vocab), model, args.max_len)
    try:
        evalset = load_evalset(args.eval_set, split=args.split)
    except (FileNotFoundError, ValueError) as err:
        raise EvalInputError(str(err)) from None
    transform = eval_transform(model.config.vision.image_size)
    amp = torch.bfloat16 if device.type == "cuda" and args.bf16 else None
    progress = not args.no_progress
    text = encode_texts(model, evalset.texts, tokenizer, args.batch_size, device,
                        progress=progress, autocast_dtype=amp)
    image, valid = encode_images(model, evalset.images, transform, args.batch_size, device,
                                 progress=progress, num_workers=args.workers, autocast_dtype=amp)
    kept, positives = drop_images(evalset.text_to_images, valid.tolist())
    if not bool(valid.all()):
        bad = [evalset.image_ids[i] for i in (~valid).nonzero().flatten().tolist()]
        dropped = len(evalset.texts) - len(kept)
        print(f"skipped {len(bad)} unreadable image(s) (first: {bad[0]!r}) and {dropped} text(s) left "
              "without a positive", file=sys.stderr)
    if not kept:
        raise EvalInputError(f"{args.eval_set}: no readable image with a text")
    image = image[valid.to(image.device)]
    for what, emb in (("text", text), ("image", image)):
        if not bool(torch.isfinite(emb).all()):
            raise EvalInputError(f"{checkpoint}: the model gives NaN or infinite {what} embeddings")
        if not bool(emb.any(dim=1).all()):
            raise EvalInputError(f"{checkpoint}: the model gives all-zero {what} embeddings")
    normalize = torch.nn.functional.normalize  # cosine similarity, as training and embed
    text, image = normalize(text, dim=-1), normalize(image, dim=-1)
    metrics = any_positive(text[kept], image, positives,
                           chunk_size=args.chunk_size, device=device)
    return metrics, len(kept), int(valid.sum())


ENCODING_FLAGS = ("--split", "--vocab", "--max-len", "--batch-size", "--workers", "--bf16")
_NOT_GIVEN = object()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ernievil2_train.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("embeddings", nargs="?", type=nonempty_path,
                   help="run_infer embeddings file: text_vec<TAB>image_vec<TAB>idx")
    p.add_argument("--image-feats", type=nonempty_path,
                   help="Chinese-CLIP image feature jsonl ({'image_id', 'feature'})")
    p.add_argument("--text-feats", type=nonempty_path,
                   help="Chinese-CLIP text feature jsonl ({'text_id', 'feature'})")
    p.add_argument("--texts", type=nonempty_path,
                   help="{split}_texts.jsonl with the ground truth ({'text_id', 'image_ids'})")
    p.add_argument("--checkpoint", type=nonempty_path,
                   help="model folder (model.safetensors + config.json [+ vocab.txt])")
    p.add_argument("--eval-set", type=nonempty_text,
                   help="eval set: Chinese-CLIP folder, shard index folder, .tar or brace pattern")
    p.add_argument("--split", default="valid", help="eval-set split (default: valid)")
    p.add_argument("--vocab", type=nonempty_path,
                   help="vocab file, for a checkpoint folder without one (else its own is used)")
    p.add_argument("--max-len", type=int, default=None,
                   help=f"text length in tokens (default: {OFFICIAL_MAX_LEN}, or the checkpoint's text "
                   "positions when it has fewer)")
    p.add_argument("--batch-size", type=int, default=64, help="encoding batch size (default: 64)")
    p.add_argument("--workers", type=int, default=0, help="image decoding workers (default: 0)")
    p.add_argument("--bf16", action="store_true", help="encode under bfloat16 autocast on GPU")
    p.add_argument("--protocol", choices=PROTOCOLS,
                   help="ernie (row-paired, embeddings files only; their default) or any_positive (on an "
                   "embeddings file: rows with identical vectors are one text / one image)")
    p.add_argument("--device", help="torch device for scoring / encoding (default: cuda if available)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                   help=f"query rows scored at once (default: {DEFAULT_CHUNK_SIZE})")
    p.add_argument("--no-progress", action="store_true", help="hide the encoding progress bars")
    p.add_argument("--json", action="store_true", help="print all metrics as one JSON object")
    return p


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The arguments, and the encoding flags the command line gives (a flag given its default value too):
    argparse fills in a default only where the namespace it is handed has no value yet."""
    args = p.parse_args(argv, argparse.Namespace(**{_dest(f): _NOT_GIVEN for f in ENCODING_FLAGS}))
    given = [f for f in ENCODING_FLAGS if getattr(args, _dest(f)) is not _NOT_GIVEN]
    for flag in ENCODING_FLAGS:
        if getattr(args, _dest(flag)) is _NOT_GIVEN:
            setattr(args, _dest(flag), p.get_default(_dest(flag)))
    return args, given


def _mode(p: argparse.ArgumentParser, args: argparse.Namespace, given: list[str]) -> str:
    feats = [args.image_feats, args.text_feats, args.texts]
    modes = [m for m, on in (("embeddings", args.embeddings), ("features", any(feats)),
                             ("checkpoint", args.checkpoint or args.eval_set)) if on]
    if len(modes) != 1:
        p.error("give exactly one input: an EMBEDDINGS file, --image-feats/--text-feats/--texts, "
                "or --checkpoint/--eval-set")
    if modes[0] == "features" and not all(feats):
        p.error("feature mode needs all of --image-feats, --text-feats and --texts")
    if modes[0] == "checkpoint" and not (args.checkpoint and args.eval_set):
        p.error("checkpoint mode needs both --checkpoint and --eval-set")
    if modes[0] != "checkpoint" and given:
        p.error(f"{given[0]} is for encoding (--checkpoint/--eval-set); {modes[0]} are encoded already")
    if modes[0] != "embeddings" and args.protocol == "ernie":
        p.error("--protocol ernie needs a row-paired embeddings file")
    for flag, value in (("--chunk-size", args.chunk_size), ("--batch-size", args.batch_size)):
        if value < 1:
            p.error(f"{flag} must be positive, got {value}")
    if args.workers < 0:
        p.error("--workers must be 0 or more")
    return modes[0]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, given = parse(parser, argv)
    mode = _mode(parser, args, given)
    args.protocol = args.protocol or ("ernie" if mode == "embeddings" else "any_positive")
    sources = {"embeddings": _from_embeddings, "features": _from_features, "checkpoint": _from_checkpoint}
    evaluate = sources[mode]
    try:
        args.device = resolve_device(args.device)
        metrics, num_texts, num_images = evaluate(args)
    except (ValueError, OSError) as err:  # EvalInputError, or bad values found by the metric functions
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        out = {"protocol": args.protocol, "num_texts": num_texts, "num_images": num_images, **metrics}
        print(json.dumps(out, indent=2))
    else:
        sys.stdout.write(format_table(metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main, "python -m ernievil2_train.evaluate"))
