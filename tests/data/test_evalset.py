"""Loading retrieval eval sets from the Chinese-CLIP layout and from WebDataset shards."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ernievil2_train.data.evalset import EvalSet, load_evalset
from tests.data_recipes.helpers import image_bytes

IMAGES = {
    "11": image_bytes((255, 0, 0)),
    "22": image_bytes((0, 255, 0)),
    "33": image_bytes((0, 0, 255), fmt="PNG"),
}


def _write_chinese_clip(folder: Path, texts: list[dict], split: str = "valid", urlsafe: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    enc = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    (folder / f"{split}_imgs.tsv").write_text(
        "".join(f"{k}\t{enc(v).decode()}\n" for k, v in IMAGES.items()), encoding="utf-8"
    )
    (folder / f"{split}_texts.jsonl").write_text(
        "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8"
    )


TEXTS = [
    {"text_id": 1, "text": "红色的方块", "image_ids": [11]},
    {"text_id": 2, "text": "绿色或蓝色", "image_ids": [22, 33]},
    {"text_id": 3, "text": "蓝色", "image_ids": ["33"]},
]


@pytest.mark.parametrize("urlsafe", [False, True])
def test_chinese_clip_layout(tmp_path, urlsafe):
    _write_chinese_clip(tmp_path, TEXTS, split="test", urlsafe=urlsafe)
    es = load_evalset(tmp_path, split="test")
    assert isinstance(es, EvalSet)
    assert es.image_ids == ["11", "22", "33"]
    assert es.images == list(IMAGES.values())
    assert es.text_ids == ["1", "2", "3"]
    assert es.texts == ["红色的方块", "绿色或蓝色", "蓝色"]
    assert es.text_to_images == [[0], [1, 2], [2]]
    assert len(es) == 3


def test_files_saved_with_a_byte_order_mark(tmp_path):
    """Editors on Windows save UTF-8 with a BOM; the recipes read such files, so the eval set does too."""
    _write_chinese_clip(tmp_path, TEXTS)
    for name in ("valid_imgs.tsv", "valid_texts.jsonl"):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    es = load_evalset(tmp_path, split="valid")
    assert es.image_ids == ["11", "22", "33"] and es.text_ids == ["1", "2", "3"]


def _write_tar(path: Path, samples: list[tuple[str, str, bytes, str, dict]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, ext, image, text, meta in samples:
            for suffix, data in ((ext, image), ("txt", text.encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


SHARD_SAMPLES = [
    [
        ("a0", "jpg", IMAGES["11"], "红色", {"image_id": "11", "text_id": "t0"}),
        ("a1", "jpg", IMAGES["11"], "一个方块", {"image_id": "11", "text_id": "t1"}),
    ],
    [
        ("b0", "jpg", IMAGES["22"], "一个方块", {"image_id": "22", "text_id": "t2"}),
        ("b1", "png", IMAGES["33"], "蓝色", {"image_id": "33", "text_id": "t3"}),
    ],
]


def _check_shard_set(es: EvalSet) -> None:
    assert es.image_ids == ["11", "22", "33"]
    assert es.images == [IMAGES["11"], IMAGES["22"], IMAGES["33"]]
    assert es.texts == ["红色", "一个方块", "蓝色"]
    assert es.text_ids == ["t0", "t1", "t3"]
    assert es.text_to_images == [[0], [0, 1], [2]]


def test_shards_by_pattern_list_tar_and_index(tmp_path):
    for i, samples in enumerate(SHARD_SAMPLES):
        _write_tar(tmp_path / f"val-{i:06d}.tar", samples)
    _check_shard_set(load_evalset(str(tmp_path / "val-{000000..000001}.tar")))
    _check_shard_set(load_evalset([tmp_path / "val-000000.tar", tmp_path / "val-000001.tar"]))
    index = {"shards": [{"name": "val-000000.tar", "samples": 2}, {"name": "val-000001.tar", "samples": 2}]}
    (tmp_path / "val.json").write_text(json.dumps(index))
    _check_shard_set(load_evalset(tmp_path, split="val"))
    single = load_evalset(tmp_path / "val-000001.tar")
    assert single.image_ids == ["22", "33"] and single.text_to_images == [[0], [1]]


def test_shards_of_two_data_sets_keep_their_images_apart(tmp_path):
    """Both sets number their images from 1: image 1 of each is its own image, with its own captions."""
    for folder, image, text in (("a", IMAGES["11"], "红色"), ("b", IMAGES["22"], "绿色")):
        (tmp_path / folder).mkdir()
        _write_tar(tmp_path / folder / "val-000000.tar", [("k0", "jpg", image, text, {"image_id": 1})])
    es = load_evalset([tmp_path / "a" / "val-000000.tar", tmp_path / "b" / "val-000000.tar"])
    assert es.image_ids == ["1", "1"] and es.images == [IMAGES["11"], IMAGES["22"]]
    assert es.texts == ["红色", "绿色"] and es.text_to_images == [[0], [1]]


def test_shards_written_by_the_recipe_writer(tmp_path):
    from data_recipes.shards import ImageRecord, ShardSink

    with ShardSink(tmp_path, "val", shard_size=2) as sink:
        sink.write_record(ImageRecord("11", "jpg", IMAGES["11"], [("t0", "红色"), ("t1", "一个方块")]))
        sink.write_record(ImageRecord("22", "jpg", IMAGES["22"], [("t2", "一个方块")]))
        sink.write_record(ImageRecord("33", "png", IMAGES["33"], [("t3", "蓝色")]))
    assert len(list(tmp_path.glob("val-*.tar"))) == 2
    _check_shard_set(load_evalset(tmp_path, split="val"))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"valid_imgs\.tsv"):
        load_evalset(tmp_path)
    (tmp_path / "valid_texts.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match=r"valid_imgs\.tsv"):
        load_evalset(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"val-000003\.tar"):
        load_evalset(str(tmp_path / "val-{000003..000004}.tar"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_evalset(tmp_path / "nowhere")


def test_unknown_image_id_names_id_and_line(tmp_path):
    _write_chinese_clip(tmp_path, [*TEXTS, {"text_id": 4, "text": "x", "image_ids": [11, 99]}])
    with pytest.raises(ValueError, match=r"valid_texts.jsonl:4: unknown image id 99"):
        load_evalset(tmp_path)


def test_a_repeated_text_id_is_refused_naming_the_line(tmp_path):
    """A text listed twice would be two queries of one text: refused, as images listed twice are."""
    _write_chinese_clip(tmp_path, [*TEXTS, {**TEXTS[0], "text": "又一次"}])
    first = TEXTS[0]["text_id"]
    with pytest.raises(ValueError, match=rf"valid_texts.jsonl:{len(TEXTS) + 1}: duplicate text_id '{first}'"):
        load_evalset(tmp_path)


@pytest.mark.parametrize(
    ("imgs", "texts", "message"),
    [
        ("", "", "empty eval set"),
        ("11\n", "", r"valid_imgs.tsv:1: expected"),
        ("11\taGk=\n11\taGk=\n", "", r"valid_imgs.tsv:2: duplicate image id '11'"),
        ("11\taGk=\n", '{"text_id": 1, "text": "x"}\n', r"valid_texts.jsonl:1: expected json"),
        ("11\taGk=\n", '{"text_id": 1, "text": "x", "image_ids": []}\n', r"valid_texts.jsonl:1: image_ids"),
        ("11\taGk=\n", "", "0 texts"),
    ],
)
def test_malformed_chinese_clip_files(tmp_path, imgs, texts, message):
    (tmp_path / "valid_imgs.tsv").write_text(imgs)
    (tmp_path / "valid_texts.jsonl").write_text(texts)
    with pytest.raises(ValueError, match=message):
        load_evalset(tmp_path)


def test_a_shard_cut_at_a_member_is_refused_not_read_short(tmp_path):
    """`tarfile` reads a tar cut where a member begins as a shorter, valid one: the eval set would lose its
    later images and texts without a word."""
    whole = tmp_path / "whole.tar"
    _write_tar(whole, SHARD_SAMPLES[0])
    with tarfile.open(whole) as tar:
        second = next(m for m in tar.getmembers() if m.name.startswith("a1."))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[: second.offset])
    assert len(load_evalset(whole).texts) == 2
    with pytest.raises(ValueError, match=rf"^{re.escape(str(cut))}: not a readable tar \(no end-of-archive"):
        load_evalset(cut)


def test_malformed_shards(tmp_path):
    _write_tar(tmp_path / "x.tar", [("k", "jpg", b"img", "t", {"text_id": "1"})])
    with pytest.raises(ValueError, match="image_id"):
        load_evalset(tmp_path / "x.tar")
    for name, data in (("y.tar", b"not a tar at all" * 40), ("empty.tar", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError) as caught:
            load_evalset(tmp_path / name)
        assert str(caught.value).startswith(f"{tmp_path / name}: not a readable tar (")
        assert "\n" not in str(caught.value)
    with tarfile.open(tmp_path / "z.tar", "w"):
        pass
    with pytest.raises(ValueError, match="empty eval set"):
        load_evalset(tmp_path / "z.tar")


def test_reading_an_eval_set_imports_no_torch():
    """The eval-set reader (and the recipes, which name its files through it) stay light: no torch, no
    webdataset."""
    code = ("import sys, ernievil2_train.data.evalset, data_recipes.cococn, data_recipes.tsv; "
            "print(sorted({'torch', 'webdataset'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(("row", "message"), [
    ({"text_id": None, "text": "x", "image_ids": [11]}, "text_id must be a string or an integer, got null"),
    ({"text_id": 9, "text": None, "image_ids": [11]}, "text must be a non-empty string, got None"),
    ({"text_id": 9, "text": " ", "image_ids": [11]}, "text must be a non-empty string, got ' '"),
    ({"text_id": 9, "text": "x", "image_ids": [[11]]}, 'image_ids must be a string or an integer, got [11]'),
])
def test_texts_with_ids_or_text_of_the_wrong_kind_are_refused_naming_the_line(tmp_path, row, message):
    """`null` or a list as an id would become the text "None" or "[11]" (one id for all such rows)."""
    _write_chinese_clip(tmp_path, [*TEXTS, row])
    with pytest.raises(ValueError, match=re.escape(f"valid_texts.jsonl:{len(TEXTS) + 1}: ")) as caught:
        load_evalset(tmp_path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_deeply_nested_json_is_a_one_line_error(tmp_path):
    _write_chinese_clip(tmp_path, TEXTS)
    with (tmp_path / "valid_texts.jsonl").open("a") as f:
        f.write("[" * 100_000 + "\n")
    with pytest.raises(ValueError, match=rf"valid_texts.jsonl:{len(TEXTS) + 1}: expected json with"):
        load_evalset(tmp_path)


@pytest.mark.parametrize(("meta", "text", "message"), [
    ({"image_id": None}, "红色", "image_id (image_id must be a string or an integer, got null)"),
    ({"image_id": ["x"]}, "红色", 'image_id (image_id must be a string or an integer, got ["x"])'),
    ({"image_id": 1, "text_id": None}, "红色", "text_id must be a string or an integer, got null"),
    ({"image_id": 1}, " \t", "txt holds no text"),
])
def test_shard_samples_with_ids_or_text_of_the_wrong_kind_are_refused_naming_the_sample(tmp_path, meta, text,
                                                                                          message):
    """Two samples with `image_id: null` were one image "None", the second's picture dropped."""
    _write_tar(tmp_path / "val-000000.tar", [("k0", "jpg", IMAGES["11"], text, meta)])
    with pytest.raises(ValueError, match=re.escape("val-000000.tar:k0: ")) as caught:
        load_evalset(tmp_path / "val-000000.tar")
    assert message in str(caught.value)


def test_a_caption_that_is_not_utf8_names_the_shard_and_sample(tmp_path):
    with tarfile.open(tmp_path / "val-000000.tar", "w") as tar:
        for suffix, data in (("jpg", IMAGES["11"]), ("txt", b"caf\xe9"), ("json", b'{"image_id": 1}')):
            info = tarfile.TarInfo(f"k0.{suffix}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"val-000000\.tar:k0: txt is not UTF-8 text$"):
        load_evalset(tmp_path / "val-000000.tar")
