"""Tiny real WebDataset shards, JPEGs and a vocab for the data pipeline tests."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import multiprocessing
import threading
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from ernievil2_train.data.decode import data_set_image_id
from ernievil2_train.data.keys import stable_key

PER_SHARD = 8  # samples per shard of `write_split`
CHARS = "一只狗在草地上奔跑两个人骑自行车红色的汽车停路边猫睡觉，"


def write_vocab(path: Path, chars: str = CHARS) -> Path:
    """`token<TAB>id` lines: [PAD] 0, [CLS] 1, [SEP] 2, [MASK] 3, one id per char, [UNK] last."""
    tokens = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(chars), "[UNK]"]
    path.write_text("\n".join(f"{t}\t{i}" for i, t in enumerate(tokens)), encoding="utf-8")
    return path


def smooth_image(width: int, height: int, seed: int) -> Image.Image:
    """A natural-ish RGB image: upsampled low-resolution noise plus a gradient."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    low = low.resize((width, height), Image.BICUBIC)
    ramp = np.linspace(0, 60, width, dtype=np.float32)[None, :, None]
    return Image.fromarray(np.clip(np.asarray(low, np.float32) * 0.8 + ramp, 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, **save_kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, **save_kw)
    return buf.getvalue()


def sample(index: int, width: int = 96, height: int = 72, tags: list[str] | None = None,
           captions: list[str] | None = None) -> dict:
    """One good shard sample; the caption is `captions[0]` (default: a caption built from the index)."""
    captions = captions or [f"{CHARS[index % 10]}只狗在草地上奔跑", "两个人骑自行车"]
    meta = {"image_id": f"img{index}", "text_id": f"t{index}", "captions": captions,
            "tags": ["狗", "草地"] if tags is None else tags}
    return {"__key__": f"s{index:05d}", "jpg": jpeg_bytes(smooth_image(width, height, index)),
            "txt": captions[0].encode("utf-8"), "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}


def caption_of(index: int) -> str:
    return CHARS[index % 12 : index % 12 + 3 + index % 5]


def img2dataset_sample(index: int) -> dict:
    """A sample as img2dataset writes it: `{key}.jpg`, `{key}.txt`, `{key}.json` with its own fields."""
    key = f"{index:09d}"
    image = jpeg_bytes(smooth_image(96, 72, index))
    meta = {"url": f"https://example.com/{index}.jpg", "key": key, "status": "success", "error_message": None,
            "caption": caption_of(index), "width": 96, "height": 72, "original_width": 960,
            "original_height": 720, "exif": "{}", "sha256": f"{index:064x}", "similarity": 0.31}
    return {"__key__": key, "jpg": image, "txt": caption_of(index).encode("utf-8"),
            "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}


def write_shard(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for item in samples:
            sink.write(item)
    return path


def write_split(root: Path, split: str, shards: int, offset: int, indexed: int | None = None) -> None:
    """`shards` shards of `PER_SHARD` samples (`sample(offset)` on) as a recipe writes them, with a
    `{split}.json` index listing the first `indexed` of them (default: all)."""
    entries = []
    for s in range(shards):
        name = f"{split}-{s:06d}.tar"
        write_shard(root / name, [sample(offset + s * PER_SHARD + i) for i in range(PER_SHARD)])
        entries.append({"name": name, "samples": PER_SHARD})
    entries = entries[:indexed]
    index = {"split": split, "samples": PER_SHARD * len(entries), "shards": entries}
    (root / f"{split}.json").write_text(json.dumps(index))


@contextlib.contextmanager
def serving(folder: Path) -> Iterator[str]:
    """`folder` served by a real HTTP server on a loopback port; yields its base url."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()


def _report(call: Callable[[], object], sink: Connection) -> None:
    try:
        call()
        sink.send("")
    except BaseException as exn:  # every outcome goes back to the test
        sink.send(f"{type(exn).__name__}: {exn}")


def error_within(call: Callable[[], object], seconds: float) -> str:
    """Run `call()` in a forked process: `'ErrorType: message'` of what it raised, `''` when it returned.
    A call still running after `seconds` is killed and fails the test (a hang, not an error)."""
    context = multiprocessing.get_context("fork")
    source, sink = context.Pipe(duplex=False)
    process = context.Process(target=_report, args=(call, sink), daemon=True)
    process.start()
    sink.close()
    try:
        if not source.poll(seconds):
            process.kill()
            pytest.fail(f"still running after {seconds} s")
        return source.recv()
    finally:
        process.join()


def image_key(shard: str | Path, image_id: str) -> int:
    """The image key training gives image `image_id` of the data set that shard `shard` belongs to."""
    return stable_key(data_set_image_id(str(shard), image_id))
