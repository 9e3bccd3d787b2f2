"""The generic TSV/JSONL importer: paths and base64 images, caption grouping, tags, skips."""

from __future__ import annotations

import base64
import json

import pytest

from data_recipes import tsv
from ernievil2_train.data.evalset import load_evalset
from tests.data_recipes.helpers import image_bytes, read_shards, run_recipe

RED = image_bytes((250, 0, 0))
GREEN = image_bytes((0, 250, 0))
BLUE_PNG = image_bytes((0, 0, 250), fmt="PNG")
YELLOW = image_bytes((250, 250, 0), size=(30, 30))


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    (tmp_path / "data" / "imgs" / "a.jpg").write_bytes(RED)
    (tmp_path / "data" / "imgs" / "b.png").write_bytes(BLUE_PNG)
    (tmp_path / "data" / "imgs" / "broken.jpg").write_bytes(b"this is not a jpeg")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "c.jpg").write_bytes(GREEN)
    return tmp_path


def _groups(samples):
    out = {}
    for s in samples:
        out.setdefault(s["json"]["image_id"], []).append(s)
    return out


def test_tsv_paths_base64_tags_and_skips(folder):
    absolute = str(folder / "elsewhere" / "c.jpg")
    yellow = base64.b64encode(YELLOW).decode()
    lines = [
        "imgs/a.jpg\t红色\t苹果,桌子",
        "imgs/a.jpg\t一个红色的东西\t桌子，杯子",
        "imgs/b.png\t蓝色",
        f"{absolute}\t绿色\t",
        f"{yellow}\t黄色\t香蕉",
        "imgs/missing.jpg\t不在",
        "imgs/broken.jpg\t坏的",
        "imgs/a.jpg\t  ",
        "a\tb\tc\td",
        "",
    ]
    src = folder / "data" / "pairs.tsv"
    src.write_text("\n".join(lines) + "\n")
    out = folder / "out"
    proc = run_recipe("tsv", "--input", str(src), "--out", str(out), "--workers", "2", "--shard-size", "3")
    assert proc.returncode == 0, proc.stderr
    index = json.loads((out / "train.json").read_text())
    assert index["skipped"] == {
        "empty caption": 1,
        "malformed line": 1,
        "missing file": 1,
        "undecodable image": 1,
    }
    assert "missing file: 1" in proc.stdout
    samples = read_shards(out, "train")
    assert [s["samples"] for s in index["shards"]] == [3, 2] and len(samples) == 5
    groups = _groups(samples)
    b64_id = next(i for i in groups if i.startswith("b64-"))
    assert list(groups) == ["imgs/a.jpg", "imgs/b.png", absolute, b64_id]
    a = groups["imgs/a.jpg"]
    assert [(s["json"]["text_id"], s["txt"]) for s in a] == [("0", "红色"), ("1", "一个红色的东西")]
    assert all(s["json"]["captions"] == ["红色", "一个红色的东西"] for s in a)
    assert all(s["json"]["tags"] == ["苹果", "桌子", "杯子"] and s["image"] == RED for s in a)
    assert groups["imgs/b.png"][0]["image"] == BLUE_PNG and groups["imgs/b.png"][0]["ext"] == "png"
    assert groups[absolute][0]["image"] == GREEN and groups[absolute][0]["json"]["tags"] == []
    assert groups[b64_id][0]["image"] == YELLOW and groups[b64_id][0]["json"]["tags"] == ["香蕉"]
    assert not (out / "eval").exists()


def test_jsonl_with_image_ids_to_evalset(folder):
    rows = [
        {"image": "imgs/a.jpg", "caption": "红色", "tags": ["苹果"], "image_id": "img1"},
        {"image": "imgs/a.jpg", "caption": "同一张图", "tags": "苹果，盘子", "image_id": "img1"},
        {"image": "imgs/b.png", "caption": "红色", "image_id": "img2"},
        {"caption": "no image"},
        {"image": "imgs/b.png", "caption": ""},
    ]
    src = folder / "data" / "pairs.jsonl"
    src.write_text("\n".join([json.dumps(r, ensure_ascii=False) for r in rows] + ["{broken json"]) + "\n")
    out = folder / "out"
    proc = run_recipe(
        "tsv", "--input", str(src), "--out", str(out), "--split", "valid", "--outputs", "evalset"
    )
    assert proc.returncode == 0, proc.stderr
    assert "malformed line: 2" in proc.stdout and "empty caption: 1" in proc.stdout
    assert not list(out.glob("*.tar"))
    es = load_evalset(out / "eval", split="valid")
    assert es.image_ids == ["img1", "img2"] and es.images == [RED, BLUE_PNG]
    assert es.texts == ["红色", "同一张图"] and es.text_to_images == [[0, 1], [0]]


def test_jsonl_tags_are_unioned_in_shards(folder):
    rows = [
        {"image": "imgs/a.jpg", "caption": "红色", "tags": ["苹果"], "image_id": "img1"},
        {"image": "imgs/a.jpg", "caption": "同一张图", "tags": "苹果，盘子", "image_id": "img1"},
    ]
    src = folder / "data" / "pairs.jsonl"
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    assert tsv.main(["--input", str(src), "--out", str(folder / "o"), "--workers", "1"]) == 0
    samples = read_shards(folder / "o", "train")
    assert [s["json"]["tags"] for s in samples] == [["苹果", "盘子"]] * 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--input", "nowhere.tsv"], "--input not found"),
        (["--input", "x.tsv", "--workers", "0"], "--workers"),
    ],
)
def test_user_errors_exit_2(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        tsv.main([*argv, "--out", str(tmp_path)])
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_base64_detection():
    assert tsv.looks_like_base64(base64.b64encode(RED).decode())
    assert not tsv.looks_like_base64("images/some_long_folder_name/another_long_folder_name/photo0001.jpg")
    assert not tsv.looks_like_base64("short")
