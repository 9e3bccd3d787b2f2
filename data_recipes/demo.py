"""Built-in demo set: generated scenes of coloured shapes with Chinese captions and object tags.

`python -m data_recipes.demo --out DIR` writes `DIR/train-*.tar`, `DIR/val-*.tar`, `DIR/train.json`,
`DIR/val.json`, an eval set `DIR/eval/valid_imgs.tsv` + `DIR/eval/valid_texts.jsonl` and `DIR/vocab.txt`
(`token<TAB>id`, every character used plus the special tokens). Everything is seeded and offline.
`ensure_demo()` builds it once into a cache folder and returns that folder.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_recipes.options import (
    add_writer_args,
    check_writer_args,
    int_range,
    reported,
)
from data_recipes.shards import (
    EvalSetWriter,
    FilesWriter,
    ImageRecord,
    RecipeSkips,
    ShardSink,
    all_or_nothing,
    summary,
    write_records,
)

VERSION = "1"
DONE_MARKER = "DONE"
MAX_IMAGES = 100_000
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 1024
SPECIALS_HEAD = ["[PAD]", "[CLS]", "[SEP]", "[MASK]"]
PUNCTUATION = "，。、："

COLOURS = {
    "红色": (220, 30, 30),
    "蓝色": (30, 70, 220),
    "绿色": (30, 170, 50),
    "黄色": (240, 210, 20),
    "紫色": (140, 40, 180),
    "橙色": (250, 130, 10),
}
SHAPES = ["圆形", "方块", "三角形", "星形", "菱形"]
BACKGROUNDS = {
    "灰色": (128, 128, 128),
    "黑色": (25, 25, 25),
    "白色": (235, 235, 235),
    "粉色": (250, 190, 200),
}
POSITIONS = {
    "左边": (0.25, 0.5),
    "右边": (0.75, 0.5),
    "上面": (0.5, 0.25),
    "下面": (0.5, 0.75),
    "中间": (0.5, 0.5),
}
ROWS = [("左边", "中间", "右边"), ("上面", "中间", "下面")]
SIZES = {"大": 0.17, "小": 0.1}
NUMBERS = {1: "一", 2: "两", 3: "三"}


@dataclass(frozen=True)
class DemoParams:
    """What determines the demo set's content (the cache key is derived from it)."""

    train_images: int = 2000
    val_images: int = 200
    eval_images: int = 150
    image_size: int = 80
    seed: int = 0
    no_tag_fraction: float = 0.1


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    position: str

    @property
    def name(self) -> str:
        return self.colour + self.shape


@dataclass(frozen=True)
class Scene:
    image_id: str
    seed: int
    background: str
    objects: tuple[Obj, ...]
    with_tags: bool
    image_size: int


def _layout(rng: random.Random, n: int) -> list[str]:
    if n == 1:
        return [rng.choice(list(POSITIONS))]
    row = rng.choice(ROWS)
    if n == 3:
        return list(row)
    return [row[i] for i in sorted(rng.sample(range(3), 2))]


def make_scene(rng: random.Random, image_id: str, params: DemoParams) -> Scene:
    """A random scene: 1-3 objects with distinct colour+shape, a background and a layout."""
    n = rng.choice([1, 2, 2, 3])
    names = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
    objects = tuple(
        Obj(colour, shape, rng.choice(list(SIZES)), pos)
        for (colour, shape), pos in zip(names, _layout(rng, n), strict=True)
    )
    return Scene(
        image_id=image_id,
        seed=rng.getrandbits(32),
        background=rng.choice(list(BACKGROUNDS)),
        objects=objects,
        with_tags=rng.random() >= params.no_tag_fraction,
        image_size=params.image_size,
    )


def _relation(a: Obj, b: Obj) -> str:
    """Where `a` is relative to `b` (they lie on one row or one column)."""
    (ax, ay), (bx, by) = POSITIONS[a.position], POSITIONS[b.position]
    if ax != bx:
        return "左边" if ax < bx else "右边"
    return "上面" if ay < by else "下面"


def captions(scene: Scene, rng: random.Random) -> list[str]:
    """Two or three different phrasings that describe the scene."""
    objs, bg = scene.objects, scene.background
    if len(objs) == 1:
        (o,) = objs
        options = [
            f"一个{o.size}的{o.colour}{o.shape}在画面的{o.position}",
            f"画面{o.position}有一个{o.colour}的{o.shape}",
            f"{bg}背景上有一个{o.size}的{o.name}",
        ]
    elif len(objs) == 2:
        a, b = objs
        options = [
            f"一个{a.colour}的{a.shape}在{b.name}的{_relation(a, b)}",
            f"画面中有一个{a.size}的{a.name}和一个{b.size}的{b.name}",
            f"{bg}背景上有{a.name}和{b.name}",
            f"{b.name}在{a.name}的{_relation(b, a)}。",
        ]
    else:
        a, b, c = objs
        options = [
            f"画面中有{a.name}、{b.name}和{c.name}",
            f"一个{a.colour}的{a.shape}在{a.position}，一个{b.colour}的{b.shape}在{b.position}，"
            f"还有一个{c.colour}的{c.shape}在{c.position}",
            f"{bg}背景上有{NUMBERS[3]}个物体：{a.name}、{b.name}和{c.name}",
        ]
    return rng.sample(options, rng.choice([2, 3]))


def render(scene: Scene) -> bytes:
    """Draw the scene (with a little seeded background noise) and return JPEG bytes."""
    size = scene.image_size
    rng = np.random.default_rng(scene.seed)
    base = np.array(BACKGROUNDS[scene.background], dtype=np.int16)
    pixels = base + rng.integers(-12, 13, size=(size, size, 3), dtype=np.int16)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        fx, fy = POSITIONS[obj.position]
        jitter = rng.uniform(-0.04, 0.04, size=2)
        cx, cy = (fx + jitter[0]) * size, (fy + jitter[1]) * size
        r = SIZES[obj.size] * size
        _draw_shape(draw, obj.shape, cx, cy, r, COLOURS[obj.colour])
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "圆形":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "方块":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
    elif shape == "三角形":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "菱形":
        draw.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=fill)
    else:
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = np.pi * k / 5 - np.pi / 2
            points.append((cx + radius * np.cos(angle), cy + radius * np.sin(angle)))
        draw.polygon(points, fill=fill)


@dataclass(frozen=True)
class Job:
    scene: Scene
    captions: tuple[str, ...]


def _prepare(job: Job) -> ImageRecord:
    scene = job.scene
    return ImageRecord(
        image_id=scene.image_id,
        ext="jpg",
        data=render(scene),
        captions=[(f"{scene.image_id}-{i}", text) for i, text in enumerate(job.captions)],
        tags=[o.name for o in scene.objects] if scene.with_tags else [],
    )


def make_jobs(split: str, count: int, params: DemoParams) -> list[Job]:
    """The scenes and captions of one split; each split has its own seeded stream."""
    digest = hashlib.sha256(f"{params.seed}:{split}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "little"))
    jobs = []
    for i in range(count):
        scene = make_scene(rng, f"{split}{i:06d}", params)
        jobs.append(Job(scene, tuple(captions(scene, rng))))
    return jobs


def vocab_tokens() -> list[str]:
    """Every token the demo captions and tags can produce, in vocab order (specials first, [UNK] last)."""
    words = [*COLOURS, *SHAPES, *BACKGROUNDS, *POSITIONS, *SIZES, *NUMBERS.values()]
    fixed = "一个的在画面有和中背景上还物体两三"
    chars = sorted(set("".join(words) + fixed + PUNCTUATION))
    return [*SPECIALS_HEAD, *chars, "[UNK]"]


def vocab_text() -> str:
    """The demo vocabulary file: a `token<TAB>id` line per token."""
    return "\n".join(f"{tok}\t{i}" for i, tok in enumerate(vocab_tokens())) + "\n"


def build(
    out: Path,
    params: DemoParams,
    workers: int = 1,
    shard_size: int = 500,
    shard_bytes: int = 1_000_000_000,
    verbose: bool = True,
) -> None:
    """Write the whole demo set into `out`: all of it, or (on a failure or interruption) none of it, the
    earlier contents of `out` left as they were."""
    out = Path(out)
    splits = [
        ("train", params.train_images, lambda: ShardSink(out, "train", shard_size, shard_bytes)),
        ("val", params.val_images, lambda: ShardSink(out, "val", shard_size, shard_bytes)),
        ("eval", params.eval_images, lambda: EvalSetWriter(out / "eval", "valid", group_by="text")),
    ]
    reports = []
    with all_or_nothing() as writers:
        for split, count, make_sink in splits:
            skips = RecipeSkips()
            sink = make_sink()
            writers.append(sink)
            jobs = make_jobs(split, count, params)
            write_records(jobs, _prepare, [sink], skips, workers, count, f"demo {split}", progress=verbose)
            reports.append(([sink], skips, split))
        files = {"vocab.txt": vocab_text().encode("utf-8"),
                 "params.json": json.dumps({"version": VERSION, **asdict(params)}, indent=1).encode("utf-8")}
        writers.append(FilesWriter(out, files))
    if verbose:
        for report in reports:
            print(summary(*report))
        print(f"vocab: {len(vocab_tokens())} tokens in {out / 'vocab.txt'}")


def cache_root() -> Path:
    """`$ERNIEVIL2_CACHE/demo`, or `~/.cache/ernievil2_train/demo`."""
    env = os.environ.get("ERNIEVIL2_CACHE")
    return Path(env) / "demo" if env else Path.home() / ".cache" / "ernievil2_train" / "demo"


def cache_key(params: DemoParams) -> str:
    digest = hashlib.sha256(json.dumps({"version": VERSION, **asdict(params)}, sort_keys=True).encode())
    return f"v{VERSION}-{digest.hexdigest()[:12]}"


def ensure_demo(root: Path | None = None, params: DemoParams | None = None) -> Path:
    """Build the demo set on first use and return its folder `root/<version-and-params key>`.

    Safe for concurrent callers (DDP ranks): a file lock serialises the build, which happens in a temporary
    folder renamed into place once the completion marker is written.
    """
    params = params or DemoParams()
    root = Path(root) if root is not None else cache_root()
    target = root / cache_key(params)
    if (target / DONE_MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / DONE_MARKER).is_file():
            return target
        if target.exists():
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
        try:
            workers = 1 if multiprocessing.current_process().daemon else min(4, os.cpu_count() or 1)
            build(tmp, params, workers=workers, verbose=False)
            (tmp / DONE_MARKER).write_text(VERSION + "\n")
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return target


def main(argv: list[str] | None = None) -> int:
    defaults = DemoParams()
    parser = argparse.ArgumentParser(prog="python -m data_recipes.demo", description=__doc__.split("\n\n")[0])
    add_writer_args(parser, shard_size=500)
    count = int_range(1, MAX_IMAGES)
    parser.add_argument("--train-images", type=count, default=defaults.train_images)
    parser.add_argument("--val-images", type=count, default=defaults.val_images)
    parser.add_argument("--eval-images", type=count, default=defaults.eval_images)
    parser.add_argument(
        "--image-size",
        type=int_range(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE),
        default=defaults.image_size,
        help=f"side of the square images ({MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE})",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    check_writer_args(parser, args)
    params = DemoParams(args.train_images, args.val_images, args.eval_images, args.image_size, args.seed)
    start = time.perf_counter()
    with reported(parser, args.out, args.out):
        build(
            args.out, params, workers=args.workers, shard_size=args.shard_size, shard_bytes=args.shard_bytes
        )
    print(f"demo built in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
