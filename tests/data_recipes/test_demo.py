"""The built-in demo set: layout, content, determinism, speed and the cached `ensure_demo`."""

from __future__ import annotations

import io
import json
import multiprocessing
import random
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_recipes import demo
from data_recipes.demo import DemoParams, build, ensure_demo
from ernievil2_train.data.evalset import load_evalset
from tests.data_recipes.helpers import read_shards, run_recipe

SMALL = DemoParams(train_images=30, val_images=8, eval_images=12, image_size=64, seed=3)


def _read_vocab(path: Path) -> dict[str, int]:
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]
    assert all(len(r) == 2 for r in rows)
    return {tok: int(i) for tok, i in rows}


def test_cli_writes_shards_index_eval_and_vocab(tmp_path):
    out = tmp_path / "demo"
    proc = run_recipe(
        "demo",
        "--out",
        str(out),
        "--train-images",
        "30",
        "--val-images",
        "8",
        "--eval-images",
        "12",
        "--image-size",
        "64",
        "--shard-size",
        "20",
        "--workers",
        "2",
    )
    assert proc.returncode == 0, proc.stderr
    assert "train: wrote" in proc.stdout and "skipped 0" in proc.stdout

    for split, n_images in (("train", 30), ("val", 8)):
        index = json.loads((out / f"{split}.json").read_text())
        samples = read_shards(out, split)
        assert [s["name"] for s in index["shards"]] == sorted(p.name for p in out.glob(f"{split}-*.tar"))
        assert sum(s["samples"] for s in index["shards"]) == index["samples"] == len(samples)
        assert all(s["samples"] <= 20 for s in index["shards"])
        assert len({s["json"]["image_id"] for s in samples}) == n_images == index["images"]
        assert not list(out.glob("*.tmp"))
        for s in samples:
            meta = s["json"]
            assert s["ext"] == "jpg" and s["image"][:2] == b"\xff\xd8"
            assert Image.open(io.BytesIO(s["image"])).size == (64, 64)
            assert s["txt"] in meta["captions"] and 2 <= len(meta["captions"]) <= 3
            assert len(set(meta["captions"])) == len(meta["captions"])
            for tag in meta["tags"]:
                assert all(tag in c or (tag[:2] in c and tag[2:] in c) for c in meta["captions"])
        per_image: dict[str, set[str]] = {}
        for s in samples:
            per_image.setdefault(s["json"]["image_id"], set()).add(s["txt"])
        assert all(texts == set(_captions_of(samples, i)) for i, texts in per_image.items())

    vocab = _read_vocab(out / "vocab.txt")
    assert [vocab[t] for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3]
    assert vocab["[UNK]"] == len(vocab) - 1
    assert sorted(vocab.values()) == list(range(len(vocab)))
    used = {c for s in read_shards(out, "train") for t in [s["txt"], *s["json"]["tags"]] for c in t}
    assert used | {"，"} <= set(vocab)

    evalset = load_evalset(out / "eval", split="valid")
    assert len(evalset.images) == 12 and len(evalset.texts) >= 12 * 2 - 2
    assert len(set(evalset.texts)) == len(evalset.texts)


def _captions_of(samples: list[dict], image_id: str) -> list[str]:
    return next(s["json"]["captions"] for s in samples if s["json"]["image_id"] == image_id)


def test_captions_name_every_object_and_image_shows_it():
    params = DemoParams(train_images=200, image_size=80)
    jobs = demo.make_jobs("train", 200, params)
    hits = total = 0
    palette = {**demo.COLOURS, **demo.BACKGROUNDS}
    for job in jobs:
        for caption in job.captions:
            for obj in job.scene.objects:
                assert obj.colour in caption and obj.shape in caption
        pixels = np.asarray(Image.open(io.BytesIO(demo.render(job.scene))).convert("RGB"), dtype=float)
        for obj in job.scene.objects:
            fx, fy = demo.POSITIONS[obj.position]
            patch = pixels[int(fy * 80) - 1 : int(fy * 80) + 2, int(fx * 80) - 1 : int(fx * 80) + 2].mean(
                (0, 1)
            )
            nearest = min(palette, key=lambda name: np.sum((np.array(palette[name]) - patch) ** 2))
            hits += nearest == obj.colour
            total += 1
    assert hits / total > 0.9


def test_some_images_have_no_tags():
    jobs = demo.make_jobs("train", 2000, DemoParams())
    untagged = sum(not j.scene.with_tags for j in jobs) / len(jobs)
    assert 0.05 < untagged < 0.15


def _contents(folder: Path) -> list:
    shards = [
        (s["key"], s["txt"], s["json"], s["image"])
        for split in ("train", "val")
        for s in read_shards(folder, split)
    ]
    return [
        shards,
        (folder / "eval" / "valid_imgs.tsv").read_bytes(),
        (folder / "eval" / "valid_texts.jsonl").read_bytes(),
        (folder / "vocab.txt").read_bytes(),
    ]


def test_build_is_deterministic_and_independent_of_workers(tmp_path):
    build(tmp_path / "a", SMALL, workers=1, verbose=False)
    build(tmp_path / "b", SMALL, workers=2, verbose=False)
    assert _contents(tmp_path / "a") == _contents(tmp_path / "b")
    build(tmp_path / "c", DemoParams(**{**SMALL.__dict__, "seed": 4}), workers=1, verbose=False)
    assert _contents(tmp_path / "a")[0] != _contents(tmp_path / "c")[0]


def test_default_build_is_fast(tmp_path):
    start = time.perf_counter()
    build(tmp_path, DemoParams(), workers=2, verbose=False)
    elapsed = time.perf_counter() - start
    size = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    print(f"default demo build: {elapsed:.1f} s, {size / 1e6:.1f} MB")
    assert json.loads((tmp_path / "train.json").read_text())["images"] == DemoParams().train_images
    assert elapsed < 60


def test_ensure_demo_builds_once_and_keys_on_params(tmp_path):
    first = ensure_demo(tmp_path, SMALL)
    assert (first / demo.DONE_MARKER).is_file() and (first / "train.json").is_file()
    stamp = (first / "train.json").stat().st_mtime_ns
    assert ensure_demo(tmp_path, SMALL) == first
    assert (first / "train.json").stat().st_mtime_ns == stamp
    other = ensure_demo(tmp_path, DemoParams(**{**SMALL.__dict__, "image_size": 48}))
    assert other != first and (other / demo.DONE_MARKER).is_file()


def test_ensure_demo_default_root_uses_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ERNIEVIL2_CACHE", str(tmp_path))
    folder = ensure_demo(params=SMALL)
    assert folder.parent == tmp_path / "demo"


def test_ensure_demo_rebuilds_an_unfinished_folder(tmp_path):
    target = tmp_path / demo.cache_key(SMALL)
    target.mkdir()
    (target / "train-000000.tar").write_bytes(b"partial")
    folder = ensure_demo(tmp_path, SMALL)
    assert folder == target and len(read_shards(folder, "train")) > 0


def _ensure(args: tuple[str, int]) -> str:
    root, seed = args
    random.seed(seed)
    return str(ensure_demo(Path(root), SMALL))


def test_ensure_demo_concurrent_callers_share_one_build(tmp_path):
    with multiprocessing.get_context("fork").Pool(3) as pool:
        results = pool.map(_ensure, [(str(tmp_path), i) for i in range(3)])
    assert len(set(results)) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        Path(results[0]).name
    ]
    assert len(read_shards(Path(results[0]), "train")) > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--train-images", "0"], "--train-images: must be an integer from 1 to 100000, got '0'"),
        (["--val-images", "-2"], "argument --val-images: must be"),
        (["--eval-images", "1000000"], "argument --eval-images: must be"),
        (["--image-size", "8"], "--image-size: must be an integer from 16 to 1024, got '8'"),
        (["--image-size", "100000"], "--image-size: must be an integer from 16 to 1024, got '100000'"),
        (["--workers", "0"], "argument --workers: must be an integer >= 1"),
        (["--shard-size", "-1"], "argument --shard-size: must be"),
        (["--out", ""], "argument --out: empty path"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        demo.main(["--out", str(tmp_path / "x"), *argv])
    assert err.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_rebuild_into_the_same_folder_removes_stale_shards(tmp_path):
    small = DemoParams(train_images=6, val_images=2, eval_images=2, image_size=32)
    build(tmp_path, small, shard_size=2, verbose=False)
    assert len(list(tmp_path.glob("train-*.tar"))) > 3
    smaller = DemoParams(train_images=2, val_images=2, eval_images=2, image_size=32)
    build(tmp_path, smaller, shard_size=100, verbose=False)
    index = json.loads((tmp_path / "train.json").read_text())
    assert sorted(p.name for p in tmp_path.glob("train-*.tar")) == ["train-000000.tar"]
    assert [s["name"] for s in index["shards"]] == ["train-000000.tar"]
    assert len(read_shards(tmp_path, "train")) == index["samples"]


def _every_file(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failed_rebuild_leaves_the_earlier_set_as_it_was(tmp_path):
    """The eval set of a second build cannot start (its staging file's name is taken by a folder) after its
    train and val splits are written: none of them replace the earlier set's, nor do its vocab and params."""
    build(tmp_path, DemoParams(train_images=4, val_images=2, eval_images=2, image_size=32), verbose=False)
    before = _every_file(tmp_path)
    blocker = tmp_path / "eval" / "valid_imgs.tsv.tmp"
    blocker.mkdir()
    other = DemoParams(train_images=6, val_images=3, eval_images=2, image_size=32, seed=9)
    with pytest.raises(IsADirectoryError):
        build(tmp_path, other, shard_size=2, verbose=False)
    blocker.rmdir()
    assert _every_file(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_vocab_tokenizes_every_demo_text_without_unknowns(tmp_path):
    from ernievil2_train.text import ErnieTokenizer

    build(tmp_path, SMALL, verbose=False)
    tok = ErnieTokenizer(tmp_path / "vocab.txt")
    samples = read_shards(tmp_path, "train")
    texts = {s["txt"] for s in samples} | {"，".join(s["json"]["tags"]) for s in samples if s["json"]["tags"]}
    for text in texts:
        ids = tok.encode(text)
        assert tok.unk_id not in ids and len(ids) == len(text) <= 46
