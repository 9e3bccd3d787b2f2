"""Data pipeline throughput per worker process: ours (two views + three token rows) vs OpenCLIP's WebDataset
pipeline (one view + one token row), on the same shards of natural-ish JPEGs with Chinese captions.

    python bench/data_pipeline.py [--samples 1000] [--workers 1 2] [--width 500 --height 375]

OpenCLIP's side is assembled the way `open_clip_train.data.get_wds_dataset` does it (tar samples -> shuffle ->
decode "pilrgb" -> rename -> map_dict(preprocess, tokenizer) -> to_tuple -> batched), with the library's own
`open_clip.image_transform(is_train=True)` and tokenizer; `open_clip_train.data` itself needs pandas.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from ernievil2_train.data.datamodule import MultiViewDataModule

WORDS = ["一只", "小狗", "在", "绿色的", "草地上", "奔跑", "两个", "孩子", "骑着", "自行车", "穿过", "城市",
         "街道", "旁边", "停着", "一辆", "汽车", "天空", "很", "蓝", "桌子上", "放着", "水果", "和", "咖啡"]
TAGS = ["狗", "草地", "孩子", "自行车", "汽车", "街道", "天空", "桌子", "水果"]


def natural_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth random colour fields, a gradient and fine texture: decodes like a photo, not like noise."""
    low = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    low = low.resize((width, height), Image.BICUBIC)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    texture = 12 * np.sin(x / rng.uniform(2, 9)) * np.cos(y / rng.uniform(2, 9))
    grain = rng.normal(0, 4, (height, width, 1))
    pixels = np.asarray(low, np.float32) + (x / width * 50)[..., None] + texture[..., None] + grain
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def caption(rng: np.random.Generator) -> str:
    return "".join(rng.choice(WORDS, size=int(rng.integers(6, 14))))


def write_data(root: Path, samples: int, shards: int, width: int, height: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    per_shard = -(-samples // shards)
    for s in range(shards):
        with wds.TarWriter(str(root / f"train-{s:06d}.tar")) as sink:
            for i in range(s * per_shard, min(samples, (s + 1) * per_shard)):
                buf = io.BytesIO()
                natural_image(rng, width, height).save(buf, "JPEG", quality=90)
                captions = [caption(rng) for _ in range(2)]
                tags = list(rng.choice(TAGS, size=int(rng.integers(0, 4)), replace=False))
                meta = {"image_id": f"i{i}", "text_id": f"t{i}", "captions": captions, "tags": tags}
                sink.write({"__key__": f"{i:08d}", "jpg": buf.getvalue(), "txt": captions[0].encode(),
                            "json": json.dumps(meta, ensure_ascii=False).encode()})
    chars = sorted(set("".join(WORDS + TAGS)) | {"，"})
    vocab = root / "vocab.txt"
    tokens = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", *chars, "[UNK]"]
    vocab.write_text("\n".join(f"{t}\t{i}" for i, t in enumerate(tokens)), encoding="utf-8")
    return root, vocab


def samples_per_second(batches: Iterable, count) -> float:
    """Throughput after the first batch (worker start-up excluded)."""
    iterator = iter(batches)
    next(iterator)
    start, seen = time.perf_counter(), 0
    for batch in iterator:
        seen += count(batch)
    return seen / (time.perf_counter() - start)


def ours(root: Path, vocab: Path, samples: int, workers: int, image_size: int, batch_size: int) -> float:
    dm = MultiViewDataModule(str(root), str(vocab), image_size=image_size, batch_size=batch_size,
                             num_workers=workers, epoch_samples=samples, shuffle_buffer=1000,
                             persistent_workers=False, pin_memory=False)
    return samples_per_second(dm.train_dataloader(), lambda b: len(b["image"]))


def openclip(root: Path, samples: int, workers: int, image_size: int, batch_size: int) -> float:
    import open_clip

    preprocess = open_clip.image_transform(image_size, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    urls = sorted(str(p) for p in root.glob("train-*.tar"))
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(1000),
        wds.decode("pilrgb", handler=wds.warn_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0]),
        wds.to_tuple("image", "text"),
        wds.batched(batch_size, partial=False),
    )
    loader = DataLoader(pipeline, batch_size=None, num_workers=workers)
    return samples_per_second(loader, lambda b: len(b[0]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root, vocab = write_data(Path(tmp), args.samples, args.shards, args.width, args.height)
        size = f"{args.width}x{args.height} -> {args.image_size}"
        print(f"{args.samples} JPEGs {size}, batch {args.batch_size}, ours sends uint8 images")
        print(f"{'workers':>7} {'ours (2 views + 3 texts)':>26} {'OpenCLIP (1 view + 1 text)':>28} ratio")
        for workers in args.workers:
            a = ours(root, vocab, args.samples, workers, args.image_size, args.batch_size) / workers
            b = openclip(root, args.samples, workers, args.image_size, args.batch_size) / workers
            print(f"{workers:>7} {a:>20.1f} smp/s {b:>22.1f} smp/s {a / b:>5.2f}x   (per worker)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
