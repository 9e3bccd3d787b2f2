"""The COCO-CN recipe on hand-made sets in both input layouts, with planted bad rows and COCO tags."""

from __future__ import annotations

import base64
import io
import json
import re
from collections import Counter

import pytest
from PIL import Image

from data_recipes import cococn
from ernievil2_train.data.evalset import load_evalset
from tests.data_recipes.helpers import error_line, image_bytes, read_shards, run_recipe

RED = image_bytes((250, 0, 0))
GREEN = image_bytes((0, 250, 0), size=(20, 30))
BLUE_PNG = image_bytes((0, 0, 250), fmt="PNG")
NOT_AN_IMAGE = base64.b64encode(b"hello, not an image").decode()
COCO_IDS = set(range(1, 91)) - {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}


def _b64(data: bytes, urlsafe: bool = False) -> str:
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data).decode()


@pytest.fixture
def instances(tmp_path):
    path = tmp_path / "instances_val2014.json"
    anns = [
        (101, 1, 100.0),  # person
        (101, 18, 500.0),  # dog
        (101, 1, 50.0),
        (102, 17, 10.0),  # cat
        (102, 200, 5.0),  # not a COCO category: English name from the file
        (555, 3, 1.0),
    ]
    data = {
        "categories": [{"id": 1, "name": "person"}, {"id": 200, "name": "widget"}],
        "annotations": [{"image_id": i, "category_id": c, "area": a} for i, c, a in anns],
    }
    path.write_text(json.dumps(data))
    return path


def _by_image(samples: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for s in samples:
        out.setdefault(s["json"]["image_id"], []).append(s)
    return out


def test_chinese_clip_layout_to_shards_and_evalset(tmp_path, instances):
    src = tmp_path / "src"
    src.mkdir()
    imgs = [
        ("101", _b64(RED, urlsafe=True)),
        ("COCO_val2014_000000000102", _b64(GREEN)),
        ("103", _b64(BLUE_PNG)),
        ("104", "!!!not-base64!!!"),
        ("105", NOT_AN_IMAGE),
        ("106", _b64(RED)),
        ("101", _b64(GREEN)),
    ]
    (src / "valid_imgs.tsv").write_text("".join(f"{i}\t{b}\n" for i, b in imgs))
    texts = [
        {"text_id": 1, "text": "红色的图片", "image_ids": [101]},
        {"text_id": 2, "text": "绿色", "image_ids": ["COCO_val2014_000000000102"]},
        {"text_id": 3, "text": "两张图", "image_ids": [101, "COCO_val2014_000000000102"]},
        {"text_id": 4, "text": "  ", "image_ids": [101]},
        {"text_id": 5, "text": "不存在", "image_ids": [999]},
        {"text_id": 6, "text": "蓝色", "image_ids": [103]},
        {"text_id": 7, "text": "坏的", "image_ids": [104]},
        {"text_id": 8, "text": "不是图片", "image_ids": [105]},
    ]
    lines = [json.dumps(t, ensure_ascii=False) for t in texts]
    (src / "valid_texts.jsonl").write_text("\n".join([*lines, "not json", ""]) + "\n")
    out = tmp_path / "out"
    proc = run_recipe(
        "cococn",
        "--input",
        str(src),
        "--split",
        "valid",
        "--out",
        str(out),
        "--coco-instances",
        str(instances),
        "--workers",
        "2",
        "--shard-size",
        "2",
    )
    assert proc.returncode == 0, proc.stderr

    samples = read_shards(out, "valid")
    index = json.loads((out / "valid.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [2, 2, 1] and index["samples"] == len(samples) == 5
    assert index["skipped"] == {
        "bad base64": 1,
        "duplicate image id": 1,
        "empty caption": 1,
        "image without captions": 1,
        "malformed text line": 1,
        "undecodable image": 1,
        "unknown image id": 1,
    }
    for reason, n in index["skipped"].items():
        assert f"{reason}: {n}" in proc.stdout
    assert "valid: tags from COCO instances for 2 of the input's images (3 annotated" in proc.stdout
    groups = _by_image(samples)
    assert list(groups) == ["101", "COCO_val2014_000000000102", "103"]
    red, green, blue = groups.values()
    assert [(s["json"]["text_id"], s["txt"]) for s in red] == [("1", "红色的图片"), ("3", "两张图")]
    assert [(s["json"]["text_id"], s["txt"]) for s in green] == [("2", "绿色"), ("3", "两张图")]
    assert all(s["json"]["captions"] == ["红色的图片", "两张图"] for s in red)
    assert all(s["json"]["captions"] == ["绿色", "两张图"] for s in green)
    assert blue[0]["json"] == {"image_id": "103", "text_id": "6", "captions": ["蓝色"], "tags": []}
    assert all(s["json"]["tags"] == ["狗", "人"] for s in red)
    assert all(s["json"]["tags"] == ["猫", "widget"] for s in green)
    assert all(s["image"] == RED and s["ext"] == "jpg" for s in red)
    assert all(s["image"] == GREEN for s in green)
    assert blue[0]["image"] == BLUE_PNG and blue[0]["ext"] == "png"
    assert len({s["key"] for s in samples}) == 5

    es = load_evalset(out / "eval", split="valid")
    assert es.image_ids == ["101", "COCO_val2014_000000000102", "103", "106"]
    assert es.images == [RED, GREEN, BLUE_PNG, RED]
    assert es.text_ids == ["1", "3", "2", "6"]
    assert es.texts == ["红色的图片", "两张图", "绿色", "蓝色"]
    assert es.text_to_images == [[0], [0, 1], [1], [2]]


def test_ernie_three_column_layout(tmp_path, instances):
    rows = [
        f"红色的图片\t101\t{_b64(RED)}",
        f"又一张红色\t101\t{_b64(RED)}",
        f"绿色\tCOCO_val2014_000000000102\t{_b64(GREEN)}",
        f"\t101\t{_b64(RED)}",
        "坏图\t104\t!!!",
        "only two\tcolumns",
        f"蓝色\t103\t{_b64(BLUE_PNG)}",
        f"不是图片\t106\t{NOT_AN_IMAGE}",
        f"绿色\t107\t{_b64(GREEN)}",
    ]
    tsv = tmp_path / "test.tsv"
    tsv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    proc = run_recipe(
        "cococn",
        "--input",
        str(tsv),
        "--split",
        "test",
        "--outputs",
        "both",
        "--out",
        str(out),
        "--coco-instances",
        str(instances),
        "--workers",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    samples = read_shards(out, "test")
    index = json.loads((out / "test.json").read_text())
    assert index["skipped"] == {
        "bad base64": 1,
        "empty caption": 1,
        "malformed line": 1,
        "undecodable image": 1,
    }
    groups = _by_image(samples)
    assert list(groups) == ["101", "COCO_val2014_000000000102", "103", "107"]
    assert [(s["json"]["text_id"], s["txt"]) for s in groups["101"]] == [
        ("0", "红色的图片"),
        ("1", "又一张红色"),
    ]
    assert all(s["json"]["captions"] == ["红色的图片", "又一张红色"] for s in groups["101"])
    assert groups["101"][0]["json"]["tags"] == ["狗", "人"]
    assert groups["COCO_val2014_000000000102"][0]["json"]["tags"] == ["猫", "widget"]
    assert groups["103"][0]["json"]["tags"] == [] and groups["103"][0]["image"] == BLUE_PNG
    assert groups["101"][0]["image"] == RED and groups["107"][0]["image"] == GREEN

    es = load_evalset(out / "eval", split="test")
    assert es.texts == ["红色的图片", "又一张红色", "绿色", "蓝色"]
    assert es.text_to_images == [[0], [0], [1, 3], [2]]


def test_train_split_writes_shards_only_and_max_size_reencodes(tmp_path):
    big = image_bytes((10, 200, 30), size=(120, 60))
    tsv = tmp_path / "train.tsv"
    tsv.write_text(f"大图\t1\t{_b64(big)}\n小图\t2\t{_b64(RED)}\n")
    proc = run_recipe("cococn", "--input", str(tsv), "--out", str(tmp_path / "o"), "--max-size", "40")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "o" / "eval").exists()
    samples = {s["json"]["image_id"]: s for s in read_shards(tmp_path / "o", "train")}
    assert samples["2"]["image"] == RED
    resized = Image.open(io.BytesIO(samples["1"]["image"]))
    assert resized.format == "JPEG" and resized.size == (40, 20)


def _clip_folder(tmp_path, texts: bytes, name: str = "src", ids: tuple[str, str] = ("101", "102")):
    """A Chinese-CLIP `valid` split: a red and a green image under `ids`, and the given text lines."""
    src = tmp_path / name
    src.mkdir()
    (src / "valid_imgs.tsv").write_text(f"{ids[0]}\t{_b64(RED)}\n{ids[1]}\t{_b64(GREEN)}\n")
    (src / "valid_texts.jsonl").write_bytes(texts)
    return src


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def _text_line(text_id: int, text: str, image_id: int, encoding: str = "utf-8") -> bytes:
    row = {"text_id": text_id, "text": text, "image_ids": [image_id]}
    return (json.dumps(row, ensure_ascii=False) + "\n").encode(encoding)


def test_lines_that_are_not_utf8_are_skipped_and_counted(tmp_path):
    src = _clip_folder(tmp_path, _text_line(1, "红色", 101) + _text_line(2, "绿色", 102, "gbk"))
    ernie = tmp_path / "test.tsv"
    ernie.write_bytes(f"红色\t101\t{_b64(RED)}\n".encode() + f"绿色\t102\t{_b64(GREEN)}\n".encode("gbk"))
    for args, reason in (
        (["--input", str(src), "--split", "valid"], "not UTF-8 text line: 1 (first: line 2)"),
        (["--input", str(ernie), "--split", "test"], "not UTF-8 line: 1 (first: line 2)"),
    ):
        out = tmp_path / args[-1]
        proc = run_recipe("cococn", *args, "--out", str(out), "--outputs", "shards", "--workers", "1")
        assert proc.returncode == 0, proc.stderr
        assert reason in proc.stdout
        assert [(s["txt"], s["image"]) for s in read_shards(out, args[-1])] == [("红色", RED)]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ("一只猫\t0\n一辆车\t1\n", "malformed line: 2 (first: line 1, line 2)"),
        ("一只猫\t0\t!!!notbase64@@@\n一辆车\t1\t@@\n", "bad base64: 2 (first: 0, 1)"),
        ("", "holds no samples"),
        ("红色的猫\t0\t红\n".encode("gbk") * 2, "not UTF-8 line: 2 (first: line 1, line 2)"),
    ],
)
def test_nothing_written_is_an_error(tmp_path, lines, expected):
    tsv = tmp_path / "test.tsv"
    (tsv.write_bytes if isinstance(lines, bytes) else tsv.write_text)(lines)
    out = tmp_path / "out"
    proc = run_recipe("cococn", "--input", str(tsv), "--split", "test", "--out", str(out), "--workers", "1")
    line = error_line(proc)
    assert line.startswith("python -m data_recipes.cococn: error: nothing written") and str(tsv) in line
    assert expected in line
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_chinese_clip_folder_with_gbk_texts_is_an_error(tmp_path):
    texts = b"".join(_text_line(i, "红色", 101 + i % 2, "gbk") for i in range(4))
    src = _clip_folder(tmp_path, texts)
    proc = run_recipe("cococn", "--input", str(src), "--split", "valid", "--out", str(tmp_path / "o"))
    line = error_line(proc)
    assert f"nothing written from {src}" in line
    assert "not UTF-8 text line: 4 (first: line 1, line 2, line 3); 2 more for other reasons" in line


@pytest.mark.parametrize("name", ["valid_imgs.tsv", "valid_texts.jsonl"])
def test_a_chinese_clip_file_instead_of_its_folder_is_an_error(tmp_path, name):
    src = _clip_folder(tmp_path, _text_line(1, "红色", 101))
    proc = run_recipe("cococn", "--input", str(src / name), "--split", "valid", "--out", str(tmp_path / "o"))
    assert error_line(proc) == (
        f"python -m data_recipes.cococn: error: --input {src / name} is one file of the Chinese-CLIP layout: "
        f"pass its folder (--input {src} --split valid)"
    )
    assert proc.stderr.count("\n") == 1


def test_instances_of_no_input_image_are_reported(tmp_path, instances):
    """An instances file of another split annotates none of the input's images: the run says so."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "valid_imgs.tsv").write_text(f"7\t{_b64(RED)}\n")
    (src / "valid_texts.jsonl").write_text(json.dumps({"text_id": 1, "text": "红", "image_ids": [7]}) + "\n")
    proc = run_recipe("cococn", "--input", str(src), "--split", "valid", "--out", str(tmp_path / "out"),
                      "--coco-instances", str(instances))
    assert proc.returncode == 0, proc.stderr
    assert "tags from COCO instances for 0 of the input's images (3 annotated" in proc.stdout
    assert "no input image id is annotated in the instances files" in proc.stderr


def test_bad_coco_instances_give_a_short_error(tmp_path):
    src = _clip_folder(tmp_path, _text_line(1, "红色", 101))
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(bytes(range(128, 256)) * 2000)
    a_list = tmp_path / "list.json"
    a_list.write_text("[1, 2]")
    cases = [
        (tmp_path, "is a folder, not a COCO instances json"),
        (garbage, "is not a COCO instances json (not UTF-8 text"),
        (a_list, "is not a COCO instances json (AttributeError"),
    ]
    for instances, message in cases:
        proc = run_recipe(
            "cococn", "--input", str(src), "--split", "valid", "--out", str(tmp_path / "o"),
            "--coco-instances", str(instances),
        )  # fmt: skip
        line = error_line(proc)
        assert f"--coco-instances: {instances} {message}" in line and len(proc.stderr) < 400
        assert proc.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--input", "nowhere"], "--input not found: nowhere"),
        (["--input", "."], "input file missing"),
        (["--input", ".", "--coco-instances", "missing.json"], "missing.json"),
        (["--input", ".", "--max-size", "0"], "--max-size: must be an integer >= 1"),
        (["--input", ".", "--split", "a/b"], "--split: must be a non-empty name without path separators"),
        (["--input", ".", "--split", " "], "argument --split: must be"),
    ],
)
def test_user_errors_exit_2(tmp_path, extra, message, capsys):
    with pytest.raises(SystemExit) as err:
        cococn.main(["--split", "xyz", *extra, "--out", str(tmp_path / "o")])
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_an_eval_set_written_over_its_own_input_is_refused(tmp_path, capsys):
    """`--input D/eval --out D` would replace the files the run reads with filtered copies."""
    src = tmp_path / "D" / "eval"
    src.mkdir(parents=True)
    (src / "train_imgs.tsv").write_text(f"1\t{_b64(RED)}\n2\tnot an image\n")
    (src / "train_texts.jsonl").write_text(json.dumps({"text_id": 1, "text": "红", "image_ids": [1]}) + "\n")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    args = ["--input", str(src), "--split", "train", "--out", str(tmp_path / "D"), "--workers", "1"]
    with pytest.raises(SystemExit) as err:
        cococn.main([*args, "--outputs", "both"])
    assert err.value.code == 2
    assert capsys.readouterr().err == (
        f"python -m data_recipes.cococn: error: --out {tmp_path / 'D'}: the run would write "
        f"{src / 'train_imgs.tsv'}, which it reads; choose other --out\n"
    )
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    assert cococn.main([*args, "--outputs", "shards"]) == 0
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_category_table_and_coco_ids():
    names = cococn.category_names()
    assert set(names) == COCO_IDS and len(set(names.values())) == 80
    assert names[1] == "人" and names[18] == "狗"
    assert cococn.coco_id("COCO_train2014_000000581929") == 581929
    assert cococn.coco_id("139") == 139 and cococn.coco_id("139.jpg") == 139
    assert cococn.coco_id("abc") is None


def test_text_lines_outside_the_layout_are_counted_never_guessed(tmp_path):
    texts = [
        {"text_id": 1, "text": "红色", "image_ids": [101]},
        {"text_id": 1, "text": "同一个编号", "image_ids": [102]},
        {"text_id": 2, "text": "列了两次", "image_ids": [101, "101"]},
        {"text_id": 3, "text": "没有图片", "image_ids": []},
        {"text_id": 4, "text": "字符串", "image_ids": "102"},
        {"text_id": 5, "text": None, "image_ids": [102]},
        {"text_id": None, "text": "没有编号", "image_ids": [102]},
        {"text_id": 6, "text": "绿色", "image_ids": [102]},
    ]
    src = _clip_folder(tmp_path, _jsonl(texts) + b"[" * 100_000 + b"\n")  # too deep for the json reader
    out = tmp_path / "out"
    proc = run_recipe("cococn", "--input", str(src), "--split", "valid", "--out", str(out), "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "valid.json").read_text())["skipped"] == {
        "duplicate text id": 1,
        "malformed text line": 4,
        "text without image ids": 1,
    }
    assert "duplicate text id: 1 (first: line 2 (1))" in proc.stdout
    pairs = [(s["json"]["image_id"], s["json"]["text_id"], s["txt"]) for s in read_shards(out, "valid")]
    assert pairs == [("101", "1", "红色"), ("101", "2", "列了两次"), ("102", "6", "绿色")]
    es = load_evalset(out / "eval", split="valid")
    assert list(zip(es.text_ids, es.texts, es.text_to_images, strict=True)) == [
        ("1", "红色", [0]),
        ("2", "列了两次", [0]),
        ("6", "绿色", [1]),
    ]


def test_eval_set_keeps_images_that_no_text_names(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "valid_imgs.tsv").write_text(f"101\t{_b64(RED)}\n102\t{_b64(GREEN)}\n103\t{_b64(BLUE_PNG)}\n")
    (src / "valid_texts.jsonl").write_bytes(_text_line(1, "绿色", 102))
    for outputs in ("both", "evalset", "shards"):
        out = tmp_path / outputs
        args = ["--input", str(src), "--split", "valid", "--out", str(out), "--outputs", outputs]
        proc = run_recipe("cococn", *args, "--workers", "2")
        assert proc.returncode == 0, proc.stderr
        if outputs != "evalset":
            assert [s["json"]["image_id"] for s in read_shards(out, "valid")] == ["102"]
            assert "image without captions: 2 (first: 101, 103)" in proc.stdout
            index = json.loads((out / "valid.json").read_text())
            assert index["images"] == 1 and index["skipped"] == {"image without captions": 2}
        if outputs != "shards":
            es = load_evalset(out / "eval", split="valid")
            assert es.image_ids == ["101", "102", "103"] and es.images == [RED, GREEN, BLUE_PNG]
            assert es.texts == ["绿色"] and es.text_to_images == [[1]]
            assert "eval set of 3 images (2 of them without texts) and 1 texts" in proc.stdout


def test_eval_set_ids_are_json_integers_as_in_chinese_clip(tmp_path):
    texts = [
        {"text_id": 7, "text": "红色", "image_ids": [101]},
        {"text_id": "t8", "text": "两张", "image_ids": ["101", "0102"]},
    ]
    src = _clip_folder(tmp_path, _jsonl(texts), ids=("101", "0102"))
    out = tmp_path / "out"
    proc = run_recipe("cococn", "--input", str(src), "--split", "valid", "--out", str(out), "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (out / "eval" / "valid_texts.jsonl").read_text().splitlines()]
    assert rows == [
        {"text_id": 7, "text": "红色", "image_ids": [101]},
        {"text_id": "t8", "text": "两张", "image_ids": [101, "0102"]},
    ]
    assert [line.split("\t")[0] for line in (out / "eval" / "valid_imgs.tsv").read_text().splitlines()] == [
        "101",
        "0102",
    ]
    assert {s["json"]["text_id"] for s in read_shards(out, "valid")} == {"7", "t8"}


def test_ernie_rows_of_one_id_with_other_image_data_are_skipped(tmp_path):
    rows = [
        f"红色\t5\t{_b64(RED)}",
        "",
        f"又是红色\t5\t{_b64(RED, urlsafe=True)}",
        f"其实是绿色\t5\t{_b64(GREEN)}",
        f"绿色\t6\t{_b64(GREEN)}",
        "",
    ]
    tsv = tmp_path / "test.tsv"
    tsv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    proc = run_recipe("cococn", "--input", str(tsv), "--split", "test", "--out", str(out), "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "test.json").read_text())["skipped"] == {"conflicting image for id": 1}
    assert "conflicting image for id: 1 (first: line 4 (5))" in proc.stdout
    samples = read_shards(out, "test")
    assert [(s["json"]["image_id"], s["txt"], s["image"]) for s in samples] == [
        ("5", "红色", RED),
        ("5", "又是红色", RED),
        ("6", "绿色", GREEN),
    ]
    assert samples[0]["json"]["captions"] == ["红色", "又是红色"]


def test_coco_tags_merge_files_and_never_name_a_category_by_its_number(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"annotations": [
        {"image_id": 7, "category_id": 18, "area": 60.0},
        {"image_id": 7, "category_id": 1, "area": 100.0},
        {"image_id": 8, "category_id": 999, "area": 5.0},
    ]}))  # fmt: skip
    second.write_text(json.dumps({"annotations": [
        {"image_id": 7, "category_id": 18, "area": 60.0},
        {"image_id": 7, "category_id": 999, "area": 500.0},
        {"image_id": 9, "category_id": 17, "area": 1.0},
    ]}))  # fmt: skip
    assert cococn.load_coco_tags([first, second]) == {7: ["狗", "人"], 9: ["猫"]}
    unnamed: Counter[int] = Counter()
    cococn.load_coco_tags([first, second], unnamed)
    assert unnamed == {999: 2}


def test_texts_without_text_are_skipped_and_their_images_stay_distractors(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "valid_imgs.tsv").write_text(f"1\t{_b64(RED)}\n2\t{_b64(GREEN)}\n")
    texts = [
        {"text_id": 1, "text": "红色", "image_ids": [1]},
        {"text_id": 2, "text": "\u200b\u200d", "image_ids": [2]},
        {"text_id": 3, "text": "\ufffd", "image_ids": [1]},
    ]
    (src / "valid_texts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
    out = tmp_path / "out"
    assert cococn.main(["--input", str(src), "--split", "valid", "--out", str(out), "--workers", "1"]) == 0
    index = json.loads((out / "valid.json").read_text())
    assert index["skipped"] == {"caption without text": 2, "image without captions": 1}
    assert [s["txt"] for s in read_shards(out, "valid")] == ["红色"]
    es = load_evalset(out / "eval", split="valid")
    assert es.image_ids == ["1", "2"] and es.texts == ["红色"] and es.text_to_images == [[0]]


def test_a_utf16_texts_file_is_a_one_line_error(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "valid_imgs.tsv").write_text(f"1\t{_b64(RED)}\n")
    texts = src / "valid_texts.jsonl"
    texts.write_text(json.dumps({"text_id": 1, "text": "红色", "image_ids": [1]}) + "\n", encoding="utf-16")
    with pytest.raises(SystemExit) as err:
        cococn.main(["--input", str(src), "--split", "valid", "--out", str(tmp_path / "out")])
    assert err.value.code == 2
    expected = f"python -m data_recipes.cococn: error: {texts}: not UTF-8 text (UTF-16?)\n"
    assert capsys.readouterr().err == expected


def test_categories_a_file_names_otherwise_than_coco_get_the_files_names(tmp_path):
    """A dataset in COCO's format with categories of its own (id 1 is "cat" there, "person" in COCO) is
    tagged with its own names, not COCO's Chinese names of the same ids."""
    path = tmp_path / "custom.json"
    path.write_text(json.dumps({
        "categories": [{"id": 1, "name": "cat"}, {"id": 18, "name": "Dog"}],
        "annotations": [{"image_id": 139, "category_id": 1, "area": 9.0},
                        {"image_id": 139, "category_id": 18, "area": 5.0}],
    }))  # fmt: skip
    renamed: dict[int, str] = {}
    assert cococn.load_coco_tags([path], renamed=renamed) == {139: ["cat", "狗"]}
    assert renamed == {1: "cat"}
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"categories": [{"id": 1, "name": "person"}], "annotations": []}))
    conflict = f"^--coco-instances: {re.escape(str(other))} names category 1 'person', an earlier file 'cat'$"
    with pytest.raises(cococn.InputError, match=conflict):
        cococn.load_coco_tags([path, other])
    src = tmp_path / "src"
    src.mkdir()
    (src / "valid_imgs.tsv").write_text(f"139\t{_b64(RED)}\n")
    text = {"text_id": 1, "text": "红", "image_ids": [139]}
    (src / "valid_texts.jsonl").write_text(json.dumps(text) + "\n")
    out = tmp_path / "out"
    proc = run_recipe("cococn", "--input", str(src), "--split", "valid", "--out", str(out),
                      "--coco-instances", str(path))
    assert proc.returncode == 0, proc.stderr
    assert ("valid: 1 categories of the instances files are not COCO's of the same id; their tags are the "
            "files' own names (first: 1 'cat')") in proc.stdout
    assert [s["json"]["tags"] for s in read_shards(out, "valid")] == [["cat", "狗"]]


@pytest.mark.parametrize("name", [None, "", "  ", 5])
def test_a_category_without_a_usable_name_gives_no_tag(tmp_path, name):
    """A null, blank or non-string name is no name: never a tag "None" or "5"."""
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"categories": [{"id": 999, "name": name}],
                                "annotations": [{"image_id": 8, "category_id": 999, "area": 5.0}]}))
    unnamed: Counter[int] = Counter()
    assert cococn.load_coco_tags([path], unnamed) == {}
    assert unnamed == {999: 1}
