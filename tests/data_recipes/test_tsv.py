"""The generic TSV/JSONL importer: paths and base64 images, caption grouping, tags, skips."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import tarfile

import pytest

from data_recipes import tsv
from data_recipes.common import group_rows
from data_recipes.shards import RecipeError, RecipeSkips
from ernievil2_train.data.evalset import load_evalset
from tests.data_recipes.helpers import error_line, image_bytes, read_shards, run_recipe

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
    assert f"missing file: 1 (first: {folder / 'data' / 'imgs' / 'missing.jpg'})" in proc.stdout
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


def assert_line_2_skipped(folder, src, reason: str) -> None:
    """The recipe over `src` skips its line 2 for `reason` (said and indexed) and keeps line 1: 红色, RED."""
    out = folder / "out"
    proc = run_recipe("tsv", "--input", str(src), "--out", str(out), "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert f"{reason}: 1 (first: line 2)" in proc.stdout
    assert json.loads((out / "train.json").read_text())["skipped"] == {reason: 1}
    assert [(s["txt"], s["image"]) for s in read_shards(out, "train")] == [("红色", RED)]


def test_data_uris_are_read_and_base64_with_a_foreign_character_is_named_by_its_line(folder):
    """A `data:image/...;base64,` value is its base64 text; base64 spoilt by one character was counted as
    an unreadable file, named by 200 characters of its text."""
    text = base64.b64encode(RED).decode()
    spoilt = (text * (1 + 4096 // len(text)))[:5000] + "!" + text
    src = folder / "data" / "pairs.tsv"
    src.write_text(f"data:image/jpeg;base64,{text}\t红色\n{spoilt}\t蓝色\n")
    assert_line_2_skipped(folder, src, "bad base64 image")


def test_one_file_written_two_ways_is_one_image(folder):
    """`imgs/a.jpg` and `./imgs//a.jpg` are one picture: one image id, its captions together (two ids would
    make each caption a false negative of the other under multi-positive training)."""
    src = folder / "data" / "pairs.tsv"
    src.write_text("imgs/a.jpg\t红色\n./imgs//a.jpg\t一个红色的方块\n")
    out = folder / "out"
    proc = run_recipe("tsv", "--input", str(src), "--out", str(out), "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    samples = read_shards(out, "train")
    assert [s["json"]["image_id"] for s in samples] == ["imgs/a.jpg", "imgs/a.jpg"]
    assert samples[0]["json"]["captions"] == ["红色", "一个红色的方块"]


def test_lines_that_are_not_utf8_are_skipped_and_counted(folder):
    src = folder / "data" / "pairs.tsv"
    src.write_bytes("imgs/a.jpg\t红色\n".encode() + "imgs/b.png\t蓝色\n".encode("gbk"))
    assert_line_2_skipped(folder, src, "not UTF-8 line")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("imgs/nope.jpg\t一只猫\nimgs/gone.jpg\t一辆车\n", "missing file: 2 (first: {base}/imgs/nope.jpg, "),
        (bytes(range(128, 256)) * 8 + b"\n\xff\xfe\n", "not UTF-8 line: 2 (first: line 1, line 2)"),
        ("", "holds no samples"),
    ],
)
def test_nothing_written_is_an_error_and_keeps_earlier_output(folder, content, expected):
    out = folder / "out"
    good = folder / "data" / "good.tsv"
    good.write_text("imgs/a.jpg\t红色\n")
    assert run_recipe("tsv", "--input", str(good), "--out", str(out), "--workers", "1").returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    src = folder / "data" / "bad.tsv"
    (src.write_bytes if isinstance(content, bytes) else src.write_text)(content)
    proc = run_recipe("tsv", "--input", str(src), "--out", str(out), "--workers", "1")
    line = error_line(proc)
    assert "nothing written" in line and str(src) in line
    assert expected.format(base=src.parent) in line
    assert "wrote" not in proc.stdout
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_rerun_removes_stale_shards_of_the_split_only(folder):
    out = folder / "out"
    src = folder / "data" / "pairs.tsv"
    src.write_text("imgs/a.jpg\t红色\nimgs/b.png\t蓝色\n../elsewhere/c.jpg\t绿色\n")
    args = ["--input", str(src), "--out", str(out), "--workers", "1", "--shard-size", "1"]
    assert run_recipe("tsv", *args).returncode == 0
    assert sorted(p.name for p in out.glob("train-*.tar")) == [f"train-00000{i}.tar" for i in range(3)]
    keep = ["train-000007.tar.tmp", "train-7.tar", "valid-000005.tar", "train-000003.tar.bak"]
    for name in keep:
        (out / name).write_bytes(b"x")
    src.write_text("imgs/a.jpg\t红色\n")
    proc = run_recipe("tsv", *args)
    assert proc.returncode == 0, proc.stderr
    assert "removed 2 stale shards" in proc.stdout
    index = json.loads((out / "train.json").read_text())
    assert [s["name"] for s in index["shards"]] == ["train-000000.tar"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["train-000000.tar", "train.json", *keep])
    with tarfile.open(out / "train-000000.tar") as tar:
        assert tar.extractfile("000000000_imgs-a-jpg_0.txt").read().decode() == "红色"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--input", "nowhere.tsv"], "--input not found"),
        (["--input", "x.tsv", "--workers", "0"], "argument --workers: must be an integer >= 1"),
        (["--input", "x.tsv", "--max-size", "0"], "--max-size: must be an integer >= 1, got '0'"),
        (["--input", "x.tsv", "--max-size", "-5"], "argument --max-size: must be an integer >= 1"),
        (["--input", "x.tsv", "--shard-size", "0"], "argument --shard-size: must be"),
        (["--input", "x.tsv", "--shard-bytes", "-1"], "argument --shard-bytes: must be"),
        (["--input", "x.tsv", "--split", "a/b"], "--split: must be a non-empty name without path separators"),
        (["--input", "x.tsv", "--split", ""], "argument --split: must be"),
        (["--input", "x.tsv", "--split", ".."], "argument --split: must be"),
        (["--input", "x.tsv", "--split", "a\\b"], "argument --split: must be"),
    ],
)
def test_user_errors_exit_2(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        tsv.main([*argv, "--out", str(tmp_path)])
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_input_folder_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        tsv.main(["--input", str(tmp_path), "--out", str(tmp_path / "o")])
    assert err.value.code == 2
    assert capsys.readouterr().err == f"python -m data_recipes.tsv: error: --input {tmp_path} is not a file\n"


def test_base64_detection():
    assert tsv.looks_like_base64(base64.b64encode(RED).decode())
    assert not tsv.looks_like_base64("images/some_long_folder_name/another_long_folder_name/photo0001.jpg")
    assert not tsv.looks_like_base64("short")


def test_carriage_returns_inside_a_line_are_skipped_never_read_into_a_caption(folder, capsys):
    """Old Mac line ends (a lone CR) made one row of two: caption "red one\rimgs/b.png", tags ["蓝色"]."""
    src = folder / "data" / "pairs.tsv"
    src.write_bytes("imgs/a.jpg\t红色\rimgs/b.png\t蓝色\r".encode())
    with pytest.raises(SystemExit) as err:
        tsv.main(["--input", str(src), "--out", str(folder / "out"), "--workers", "1"])
    assert err.value.code == 2
    assert capsys.readouterr().err.endswith(
        f"python -m data_recipes.tsv: error: nothing written from {src}: every input was skipped, carriage "
        "return inside a line: 1 (first: line 1)\n"
    )
    src.write_bytes("imgs/a.jpg\t红色\r\nimgs/b.png\t蓝\r色\n".encode())  # CRLF line ends are fine
    assert tsv.main(["--input", str(src), "--out", str(folder / "out"), "--workers", "1"]) == 0
    assert [s["txt"] for s in read_shards(folder / "out", "train")] == ["红色"]


def test_an_input_that_changes_between_the_two_passes_is_an_error(folder):
    """Lines appended (or an image replaced) after the first pass would pair captions with images that pass
    never saw: the run stops with one line instead of a KeyError, or a caption on another picture."""
    src = folder / "data" / "pairs.tsv"
    src.write_text("imgs/a.jpg\t红色\n")
    for changed in ("imgs/a.jpg\t红色\nimgs/b.png\t蓝色\n", "imgs/b.png\t红色\n"):
        src.write_text("imgs/a.jpg\t红色\n")
        total, jobs = group_rows(tsv.tsv_rows(src), RecipeSkips(), src)
        src.write_text(changed)
        with pytest.raises(RecipeError, match=re.escape(f"{src}: changed while the recipe read it (line")):
            list(jobs)
    src.write_text("imgs/a.jpg\t红色\n")
    total, jobs = group_rows(tsv.tsv_rows(src), RecipeSkips(), src)
    assert total == 1 and [job.captions for job in jobs] == [(("0", "红色"),)]


def test_a_skipped_image_of_several_captions_says_how_many_it_took_along(folder):
    """Images are counted once, lines once each: the summary tells how many captions went with an image."""
    src = folder / "data" / "pairs.tsv"
    src.write_text("imgs/broken.jpg\t坏一\nimgs/broken.jpg\t坏二\nimgs/broken.jpg\t坏三\nimgs/gone.jpg\t无\n"
                   "imgs/a.jpg\t红色\n")
    proc = run_recipe("tsv", "--input", str(src), "--out", str(folder / "out"), "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert "  undecodable image: 1 (3 captions; first: imgs/broken.jpg)\n" in proc.stdout
    assert f"  missing file: 1 (first: {folder / 'data' / 'imgs' / 'gone.jpg'})\n" in proc.stdout


def test_base64_broken_into_lines_is_read_as_base64(folder):
    """MIME base64 (`base64.encodebytes`, 76 characters a line) in a JSONL string was a malformed line."""
    src = folder / "data" / "pairs.jsonl"
    src.write_text(json.dumps({"image": base64.encodebytes(YELLOW).decode(), "caption": "黄色"}) + "\n")
    out = folder / "out"
    proc = run_recipe("tsv", "--input", str(src), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert [(s["txt"], s["image"]) for s in read_shards(out, "train")] == [("黄色", YELLOW)]


def test_a_file_named_by_its_hash_is_read_as_a_file_not_as_base64(folder):
    """Content-addressed layouts name files by a hash, without extension: a name base64 text could be."""
    digest = hashlib.sha256(RED).hexdigest()
    (folder / "data" / "cas").mkdir()
    (folder / "data" / "cas" / digest).write_bytes(RED)
    assert tsv.looks_like_base64(f"cas/{digest}")
    src = folder / "data" / "pairs.tsv"
    src.write_text(f"cas/{digest}\t红色\n")
    out = folder / "out"
    proc = run_recipe("tsv", "--input", str(src), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    samples = read_shards(out, "train")
    assert [(s["json"]["image_id"], s["image"]) for s in samples] == [(f"cas/{digest}", RED)]


def test_jsonl_image_ids_are_kept_as_given_and_bad_fields_counted(folder):
    rows = [
        {"image": "imgs/a.jpg", "caption": "零号", "image_id": 0},
        {"image": "imgs/a.jpg", "caption": "还是零号", "image_id": "0"},
        {"image": "imgs/b.png", "caption": "换了图片", "image_id": 0},
        {"image": "imgs/b.png", "caption": "空编号", "image_id": " "},
        {"image": "imgs/b.png", "caption": "空标签", "tags": [None]},
        {"image": "imgs/b.png", "caption": 12},
        {"image": "imgs/b.png", "caption": "带制表符", "image_id": "a\tb"},
        {"image": "imgs/b.png", "caption": "对象", "image_id": {"id": 1}},
    ]
    src = folder / "data" / "pairs.jsonl"
    nested = "[" * 100_000  # too deep for the json reader: a malformed line, not a traceback
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + nested + "\n")
    out = folder / "out"
    proc = run_recipe("tsv", "--input", str(src), "--out", str(out), "--split", "valid", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    index = json.loads((out / "valid.json").read_text())
    assert index["skipped"] == {"conflicting image for id": 1, "malformed line": 5}
    samples = read_shards(out, "valid")
    assert [(s["json"]["image_id"], s["txt"], s["json"]["tags"]) for s in samples] == [
        ("0", "零号", []),
        ("0", "还是零号", []),
        ("imgs/b.png", "空编号", []),
    ]
    assert samples[0]["image"] == RED and samples[2]["image"] == BLUE_PNG
    es = load_evalset(out / "eval", split="valid")
    assert es.image_ids == ["0", "imgs/b.png"] and es.text_ids == ["0", "1", "3"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_a_utf16_or_utf32_input_is_a_one_line_error(folder, encoding, capsys):
    src = folder / "data" / "pairs.tsv"
    src.write_bytes("\nimgs/a.jpg\t红色\n".encode(encoding))
    with pytest.raises(SystemExit) as err:
        tsv.main(["--input", str(src), "--out", str(folder / "out"), "--workers", "2"])
    assert err.value.code == 2
    assert capsys.readouterr().err == f"python -m data_recipes.tsv: error: {src}: not UTF-8 text (UTF-16?)\n"
    assert not (folder / "out").exists()


def test_a_nul_in_a_path_and_captions_without_text_are_skipped(folder):
    rows = [
        {"image": "imgs/a\u0000b.jpg", "caption": "路径里有空字符"},
        {"image": "imgs/a.jpg", "caption": "红色\u200b的"},
        {"image": "imgs/a.jpg", "caption": "\u200b"},
        {"image": "imgs/b.png", "caption": "\u200b\u200c\ufeff \u3000\u0000\ufffd\u0301"},
        {"image": "imgs/b.png", "caption": "\x01\x7f\u2060"},
    ]
    src = folder / "data" / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = folder / "out"
    args = ["--input", str(src), "--out", str(out), "--split", "valid", "--workers", "2"]
    assert tsv.main(args) == 0
    index = json.loads((out / "valid.json").read_text())
    assert index["skipped"] == {"caption without text": 3, "malformed line": 1}
    samples = read_shards(out, "valid")
    assert [(s["json"]["image_id"], s["txt"]) for s in samples] == [("imgs/a.jpg", "红色\u200b的")]
    es = load_evalset(out / "eval", split="valid")
    assert es.image_ids == ["imgs/a.jpg"] and es.texts == ["红色\u200b的"]
    first = folder / "data" / "nul_first.tsv"  # a stray NUL in the first line is that line's problem only
    first.write_bytes("imgs/a\0b.jpg\t路径里有空字符\nimgs/a.jpg\t红色\n".encode())
    assert tsv.main(["--input", str(first), "--out", str(folder / "out2"), "--workers", "1"]) == 0
    assert json.loads((folder / "out2" / "train.json").read_text())["skipped"] == {"malformed line": 1}
