"""The shared shard writer: rotation, index, atomic finalisation, WebDataset compatibility, summaries."""

from __future__ import annotations

import argparse
import base64
import errno
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from data_recipes import shards as shards_module
from data_recipes import tsv
from data_recipes.common import ImageJob, prepare_job
from data_recipes.shards import (
    EvalSetWriter,
    ImageRecord,
    RecipeError,
    RecipeSkips,
    ShardSink,
    Skip,
    commit,
    json_id,
    nothing_written,
    summary,
    write_outputs,
    write_records,
)
from ernievil2_train.data.evalset import load_evalset
from ernievil2_train.data.sources import resolve_shards
from tests.data_recipes.helpers import REPO_ROOT, error_line, image_bytes, read_shards, run_recipe

RED = image_bytes((250, 0, 0))


def _record(i: int, captions: int = 2) -> ImageRecord:
    return ImageRecord(
        f"img/{i}", "jpg", RED, [(f"t.{i}.{c}", f"图{i}的第{c}句") for c in range(captions)], ["标签"]
    )


def test_rotation_by_count_and_bytes_and_index(tmp_path):
    with ShardSink(tmp_path / "a", "train", shard_size=3) as sink:
        for i in range(4):
            sink.write_record(_record(i))
    index = json.loads((tmp_path / "a" / "train.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [3, 3, 2]
    assert index["samples"] == 8 and index["images"] == 4
    samples = read_shards(tmp_path / "a", "train")
    assert [s["txt"] for s in samples] == [f"图{i}的第{c}句" for i in range(4) for c in range(2)]
    assert samples[0]["json"] == {
        "image_id": "img/0",
        "text_id": "t.0.0",
        "captions": ["图0的第0句", "图0的第1句"],
        "tags": ["标签"],
    }
    assert len({s["key"] for s in samples}) == 8
    assert all("." not in s["key"] and "/" not in s["key"] for s in samples)

    with ShardSink(tmp_path / "b", "train", shard_bytes=len(RED) * 2) as sink:
        for i in range(3):
            sink.write_record(_record(i))
    index = json.loads((tmp_path / "b" / "train.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [2, 2, 2]


def test_every_file_reaches_the_disk_before_its_name(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", f"{src} {dst}"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with ShardSink(tmp_path / "s", "train", shard_size=3) as sink:
        for i in range(2):
            sink.write_record(_record(i))
    with EvalSetWriter(tmp_path / "e", "val") as writer:
        writer.write_record(_record(0))
    replaced = [names.split() for kind, names in events if kind == "replace"]
    assert [Path(dst).relative_to(tmp_path).as_posix() for _, dst in replaced] == [
        "s/train-000000.tar", "s/train-000001.tar", "s/train.json", "e/val_imgs.tsv", "e/val_texts.jsonl",
    ]  # fmt: skip
    for src, dst in replaced:
        renamed = events.index(("replace", f"{src} {dst}"))
        assert ("fsync", src) in events[:renamed]
        assert ("fsync", str(Path(dst).parent)) in events[renamed + 1 :]


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included): relative path -> bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_failed_run_keeps_nothing_and_leaves_the_earlier_output_as_it_was(tmp_path):
    def failing(i: int) -> ImageRecord:
        if i == 5:  # two shards of this run are finished: they wait in the staging folder, out of sight
            staged = sorted(p.name for p in (tmp_path / out / ".train.partial").iterdir())
            assert staged[:2] == ["train-000000.tar", "train-000001.tar"]
            assert {k: v for k, v in _files(tmp_path / out).items() if not k.startswith(".")} == earlier[out]
            raise RuntimeError("stopped")
        return _record(10 + i, captions=1)

    (tmp_path / "old" / ".train.partial").mkdir(parents=True)
    (tmp_path / "old" / ".train.partial" / "train-000009.tar").write_bytes(b"left by a killed run")
    with ShardSink(tmp_path / "old", "train", shard_size=2) as sink:
        for i in range(3):
            sink.write_record(_record(i, captions=1))
    earlier = {"old": _files(tmp_path / "old"), "new": {}}
    assert sorted(earlier["old"]) == ["train-000000.tar", "train-000001.tar", "train.json"]
    assert json.loads(earlier["old"]["train.json"])["images"] == 3
    for out in ("old", "new"):
        skips = RecipeSkips()
        with pytest.raises(RuntimeError), ShardSink(tmp_path / out, "train", 2, skips=skips) as sink:
            write_records(range(10), failing, [sink], skips, progress=False)
        assert _files(tmp_path / out) == earlier[out]
        assert sorted(p.name for p in (tmp_path / out).iterdir()) == sorted(earlier[out])


def test_a_second_run_on_the_same_split_and_folder_is_refused_while_the_first_writes(tmp_path):
    """Two runs at once would mix their shards (the second removed the first's staging folder): the second
    is refused, the first finishes untouched, and other splits or folders are not held up."""
    out = tmp_path / "out"
    first = ShardSink(out, "train", shard_size=2)
    first.write_record(_record(0))
    busy = "{}: another run is writing split '{}' there now (it holds .{}.lock)"
    with pytest.raises(RecipeError, match=re.escape(busy.format(out, "train", "train"))):
        ShardSink(out, "train")
    eval_busy = pytest.raises(RecipeError, match=re.escape(busy.format(out / "eval", "valid", "valid")))
    with eval_busy, EvalSetWriter(out / "eval", "valid"), EvalSetWriter(out / "eval", "valid"):
        pass
    with ShardSink(out, "valid") as other, ShardSink(tmp_path / "elsewhere", "train") as elsewhere:
        other.write_record(_record(1))
        elsewhere.write_record(_record(2))
    first.write_record(_record(3))
    commit([first])
    expected = [f"图{i}的第{c}句" for i in (0, 3) for c in range(2)]
    assert [s["txt"] for s in read_shards(out, "train")] == expected
    assert not list(out.glob(".*")) and not list((out / "eval").glob(".*"))
    with ShardSink(out, "train") as again:  # the lock ended with the run
        again.write_record(_record(4))
    os.close(os.open(out / ".train.lock", os.O_CREAT))  # left by a killed run: taken over, then removed
    with ShardSink(out, "train") as again:
        again.write_record(_record(4))
    assert not (out / ".train.lock").exists()


def test_a_writer_that_cannot_start_lets_go_of_its_split(tmp_path):
    """A writer failing to set up (its staging folder or temporary file cannot be made) releases the lock."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".train.partial").write_text("a file where the staging folder goes")
    with pytest.raises(FileExistsError):
        ShardSink(out, "train")
    (out / "valid_imgs.tsv.tmp").mkdir()
    with pytest.raises(IsADirectoryError):
        EvalSetWriter(out, "valid")
    assert sorted(p.name for p in out.iterdir()) == [".train.partial", "valid_imgs.tsv.tmp"]


def test_an_eval_set_that_cannot_start_leaves_no_staged_shards(tmp_path):
    """The shard sink has made its staging folder when the eval-set writer fails to start (its folder is a
    file): the run removes the staging folder too."""
    (tmp_path / "eval").write_text("a file where the eval set would go")
    args = argparse.Namespace(out=tmp_path, split="val", shard_size=2, shard_bytes=10**9, outputs="both",
                              workers=1)
    with pytest.raises(OSError):
        write_outputs(range(3), _record, RecipeSkips(), args, total=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]


def _new_record(i: int) -> ImageRecord:
    return _record(10 + i)


def test_a_failure_while_finishing_leaves_every_earlier_output_as_it_was(tmp_path, monkeypatch):
    """Shards and eval set are both finished under temporary names before either is moved into place: a full
    disk while writing the last file (the eval texts) leaves the earlier shards, index and eval set."""
    args = argparse.Namespace(out=tmp_path, split="val", shard_size=2, shard_bytes=10**9, outputs="both",
                              workers=1)
    write_outputs(range(3), _record, RecipeSkips(), args, total=3)
    earlier = _files(tmp_path)
    assert {"val-000000.tar", "val.json", "eval/val_imgs.tsv", "eval/val_texts.jsonl"} <= set(earlier)
    write_bytes = Path.write_bytes

    def full_disk(self: Path, data: bytes) -> int:
        if self.name.startswith("val_texts"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_outputs(range(5), _new_record, RecipeSkips(), args, total=5)
    assert _files(tmp_path) == earlier


def test_write_records_counts_skips_in_parallel(tmp_path):
    jobs = [
        ImageJob("ok", "aGVsbG8=", False, (("1", "x"),)),
        ImageJob("bad", "@@@", False, (("2", "y"),)),
        ImageJob("gone", str(tmp_path / "missing.jpg"), True, (("3", "z"),)),
        Skip("malformed line", 2),
    ]
    skips = RecipeSkips()
    with ShardSink(tmp_path, "train", skips=skips) as sink:
        write_records(jobs, prepare_job, [sink], skips, workers=2, progress=False)
    assert skips == {"undecodable image": 1, "bad base64": 1, "missing file": 1, "malformed line": 2}
    text = summary([sink], skips, "train")
    assert "skipped 5" in text and "malformed line: 2" in text
    assert json.loads((tmp_path / "train.json").read_text())["skipped"]["bad base64"] == 1


def test_skip_examples_are_kept_for_the_summary_and_the_error(tmp_path):
    jobs = [ImageJob(str(i), str(tmp_path / f"gone{i}.jpg"), True, (("1", "x"),)) for i in range(5)]
    jobs += [ImageJob("bad", "@@@", False, (("2", "y"),))]
    skips = RecipeSkips()
    with ShardSink(tmp_path, "train", skips=skips) as sink:
        write_records(jobs, prepare_job, [sink], skips, workers=2, progress=False)
    first = ", ".join(str(tmp_path / f"gone{i}.jpg") for i in range(3))
    assert f"  missing file: 5 (first: {first})" in summary([sink], skips, "train").splitlines()
    assert nothing_written("in.tsv", skips) == (
        f"nothing written from in.tsv: every input was skipped, missing file: 5 (first: {first}); "
        "1 more for other reasons"
    )
    assert nothing_written("in.tsv", RecipeSkips()) == "nothing written: in.tsv holds no samples"
    long = RecipeSkips()
    long.add("missing file", example="x" * 10_000)
    assert len(long.describe("missing file")) < 250


def test_close_removes_only_this_splits_unlisted_shards(tmp_path):
    others = ["train-000009.tar.tmp", "train-12.tar", "val-000003.tar", "val.json", "train-000001.tar.old",
              "train.json"]
    for name in ["train-000001.tar", "train-000002.tar", *others]:
        (tmp_path / name).write_bytes(b"old")
    with ShardSink(tmp_path, "train", shard_size=2) as sink:
        sink.write_record(_record(0))
    assert sink.removed == 2 and "removed 2 stale shards" in sink.describe()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["train-000000.tar", *others])
    with pytest.raises(RuntimeError), ShardSink(tmp_path, "val") as sink:
        raise RuntimeError("interrupted")
    assert (tmp_path / "val-000003.tar").read_bytes() == b"old"


def test_shards_of_the_splits_name_that_no_index_lists_are_another_data_sets(tmp_path):
    """A folder holding `train-*.tar` shards without a `train.json` of a recipe run: refused, not overwritten
    and removed as stale; with the index, they are an earlier run's and are replaced."""
    for name in ("train-000000.tar", "train-000001.tar"):
        (tmp_path / name).write_bytes(b"another data set's")
    refused = r"holds 2 shard\(s\) named like this run's \(train-000000\.tar, \.\.\.\) but no train\.json"
    with pytest.raises(RecipeError, match=refused):
        ShardSink(tmp_path, "train")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar", "train-000001.tar"]
    with ShardSink(tmp_path, "valid") as other_split:
        other_split.write_record(_record(0))
    (tmp_path / "train.json").write_text("{}")
    with ShardSink(tmp_path, "train") as sink:
        sink.write_record(_record(1))
    assert sink.removed == 1 and (tmp_path / "train-000000.tar").read_bytes() != b"another data set's"


@pytest.mark.parametrize("recipe", ["demo", "tsv", "cococn"])
def test_unusable_out_is_a_one_line_error(tmp_path, recipe):
    src = tmp_path / "in.tsv"
    src.write_text(f"imgs/a.jpg\t红色\t{base64.b64encode(RED).decode()}\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    inputs = [] if recipe == "demo" else ["--input", str(src)]
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    cases = [
        (a_file, "is a file, not a folder"),
        (dangling, f"is a symbolic link to {tmp_path / 'gone'}, which does not exist"),
        (a_file / "sub", "cannot be created: Not a directory"),
        ("/proc/no-such-folder/out", "cannot be created: No such file or directory"),
    ]
    for out, message in cases:
        proc = run_recipe(recipe, *inputs, "--out", str(out), "--workers", "1")
        assert error_line(proc) == f"python -m data_recipes.{recipe}: error: --out {out} {message}"
        assert proc.stderr.count("\n") == 1 and proc.stdout == ""
    assert a_file.read_text() == "keep me"


def test_shards_read_by_webdataset(tmp_path):
    with ShardSink(tmp_path, "train", shard_size=2) as sink:
        for i in range(3):
            sink.write_record(_record(i, captions=1))
    urls = [str(p) for p in sorted(tmp_path.glob("train-*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert [s["txt"] for s in samples] == ["图0的第0句", "图1的第0句", "图2的第0句"]
    assert [s["json"]["image_id"] for s in samples] == ["img/0", "img/1", "img/2"]
    assert all(s["jpg"].shape == (16, 24, 3) for s in samples)


def test_evalset_writer_groups_by_text_or_id(tmp_path):
    for group_by, expected in (("text", [["a", "b"], ["a"]]), ("text_id", [["a"], ["a"], ["b"]])):
        with EvalSetWriter(tmp_path / group_by, "valid", group_by=group_by) as writer:
            writer.write_record(ImageRecord("a", "jpg", RED, [("1", "同一句"), ("2", "另一句")]))
            writer.write_record(ImageRecord("b", "jpg", RED, [("3", "同一句")]))
        rows = [json.loads(x) for x in (tmp_path / group_by / "valid_texts.jsonl").read_text().splitlines()]
        assert [r["image_ids"] for r in rows] == expected
        assert not list((tmp_path / group_by).glob("*.tmp"))


def test_a_failed_evalset_leaves_no_folder_it_made(tmp_path):
    """A failure removes the unfinished files, and the eval folder when the writer made it; a folder that
    was there before stays."""
    for existing in (False, True):
        out = tmp_path / str(existing) / "eval"
        if existing:
            out.mkdir(parents=True)
        with pytest.raises(RuntimeError), EvalSetWriter(out, "valid") as writer:
            writer.write_record(ImageRecord("a", "jpg", RED, [("1", "一句")]))
            raise RuntimeError("input failed")
        assert out.is_dir() == existing and not any(out.parent.rglob("*.tmp"))


def test_json_id():
    assert [json_id(v) for v in ("0", "139", "-2", "0139", "-0", "1e3", "１２", "x1", "1" * 19)] == [
        0, 139, -2, "0139", "-0", "1e3", "１２", "x1", "1" * 19,
    ]  # fmt: skip


def test_the_recipes_do_not_import_torch():
    code = "import sys, data_recipes.cococn, data_recipes.demo, data_recipes.tsv; print(sorted(sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "'torch'" not in proc.stdout, proc.stderr


def test_a_full_disk_names_the_output_and_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    (tmp_path / "a.jpg").write_bytes(RED)
    src = tmp_path / "in.tsv"
    src.write_text("".join(f"a.jpg\tcaption {i}\n" for i in range(2)))
    out = tmp_path / "out"
    real_close = tarfile.TarFile.close

    def full(*args) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self) -> None:  # the end-of-archive blocks do not fit either
        real_close(self)
        full()

    monkeypatch.setattr(tarfile.TarFile, "addfile", full)
    monkeypatch.setattr(tarfile.TarFile, "close", close)
    with pytest.raises(SystemExit) as err:
        tsv.main(["--input", str(src), "--out", str(out), "--workers", "1"])
    assert err.value.code == 2
    lines = capsys.readouterr().err.replace("\r", "\n").split("\n")
    assert f"python -m data_recipes.tsv: error: {out}: No space left on device" in lines
    assert not out.exists()  # nor the folder this run made


def _killed_after_renames(renames: int, args: argparse.Namespace) -> None:
    """A recipe run that dies (as by kill -9: no clean-up runs) after `renames` of its publishing renames."""
    done = [0]
    move = shards_module.move_into_place

    def dying(tmp: Path, path: Path) -> None:
        if done[0] == renames:
            os._exit(9)
        done[0] += 1
        move(tmp, path)

    shards_module.move_into_place = dying
    write_outputs(range(5), _new_record, RecipeSkips(), args, total=5)


# the new run's renames: 5 shards, their index, then the eval set's images and texts
@pytest.mark.parametrize(("renames", "half", "earlier"), [(1, "shards", True), (7, "eval set", True),
                                                          (1, "shards", False)])
def test_a_split_half_published_by_a_killed_run_is_refused_until_a_run_completes(tmp_path, renames, half,
                                                                                  earlier):
    """Killed after the first new shard is in place (the old index lists old and new shards; or there is no
    index yet), or between the eval set's two files: readers refuse the mixed split, naming it; the next
    run of the recipe completes and clears it."""
    args = argparse.Namespace(out=tmp_path, split="val", shard_size=2, shard_bytes=10**9, outputs="both",
                              workers=1)
    if earlier:
        write_outputs(range(3), _record, RecipeSkips(), args, total=3)
    child = multiprocessing.get_context("fork").Process(target=_killed_after_renames, args=(renames, args))
    child.start()
    child.join(60)
    assert child.exitcode == 9
    refused = {"shards": lambda: resolve_shards(str(tmp_path), "val", "data.val_shards"),
               "eval set": lambda: load_evalset(tmp_path / "eval", "val")}
    with pytest.raises(ValueError, match=re.escape("is a mix of two recipe runs' files: the last run was "
                                                   "stopped while moving them into place (.val.publishing "
                                                   "is there); run the recipe again")):
        refused[half]()
    if earlier:
        refused["eval set" if half == "shards" else "shards"]()  # the other is whole: the old one or the new
    write_outputs(range(5), _new_record, RecipeSkips(), args, total=5)
    assert resolve_shards(str(tmp_path), "val", "data.val_shards").samples == 10  # 2 captions an image
    assert len(load_evalset(tmp_path / "eval", "val").images) == 5
    assert not list(tmp_path.rglob(".val.publishing"))
