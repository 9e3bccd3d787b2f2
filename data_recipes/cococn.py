"""COCO-CN (or any set in the same layouts) to shards and/or an eval set, with optional COCO object tags.

Inputs (`--input`):

* a folder in Chinese-CLIP's layout: `{split}_imgs.tsv` (`image_id<TAB>base64`) and `{split}_texts.jsonl`
  (`{"text_id", "text", "image_ids"}`);
* a file in ERNIE-ViL 2.0's 3-column test layout: `text<TAB>image_id<TAB>base64 image` (text ids are the
  0-based row numbers).

All captions of an image are grouped (`captions` in each sample's json). A text line needs a string or integer
`text_id` that no earlier line used, a string `text` and a non-empty list of image ids; a 3-column row whose
image id was first seen with other image data is skipped ("conflicting image for id").

With `--coco-instances` (one or more COCO `instances_*.json`), each image's tags are the Chinese names
(coco_categories_zh.json) of the object categories annotated in it, deduplicated and ordered by the total area
of their instances, largest first (ties: by category id). A category a file names otherwise than COCO does
(another dataset in COCO's format) is tagged with the file's own name, and the run says so. Image ids are
matched to COCO ids by their trailing digits (`139`, `COCO_val2014_000000000139`).

Outputs in `--out`: shards `{split}-%06d.tar` + `{split}.json`, and/or the eval set
`eval/{split}_imgs.tsv` + `eval/{split}_texts.jsonl` (`--outputs`, default: shards for train, both otherwise).
The eval set keeps every image of `{split}_imgs.tsv` that decodes, those no text names included (distractors,
as in MUGE), so it is scored on the same gallery as the input; the shards hold only images with captions.
Lines that are not UTF-8 or not in the layout, and captions without text (only whitespace, control or format
characters), are skipped and counted; a run that writes nothing, or an input in UTF-16, is an error (exit
status 2).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from data_recipes.common import (
    ImageJob,
    Row,
    caption_problem,
    group_rows,
    line_skip,
    prepare_job,
    read_lines,
    unique,
)
from data_recipes.options import (
    add_importer_args,
    check_input,
    check_inputs_kept,
    check_writer_args,
    fail,
    reported,
)
from data_recipes.shards import (
    SKIP_EXAMPLES,
    RecipeError,
    RecipeSkips,
    Skip,
    chosen_outputs,
    short_error,
    write_outputs,
)
from ernievil2_train.arguments import nonempty_path
from ernievil2_train.data.evalset import clip_layout_files

CATEGORY_TABLE = Path(__file__).with_name("coco_categories_zh.json")
_TRAILING_DIGITS = re.compile(r"(\d+)$")
_CLIP_FILE = re.compile(r"(.+)_(imgs\.tsv|texts\.jsonl)")


class InputError(RecipeError):
    """A user mistake in the inputs (missing file, unreadable instances json); reported in one line."""


def category_names(field: str = "zh") -> dict[int, str]:
    """COCO category id -> its name in the shipped table: "zh" the Chinese one, "name" COCO's own (English),
    as instances files of COCO itself give it."""
    table = json.loads(CATEGORY_TABLE.read_text(encoding="utf-8"))
    return {int(k): v[field] for k, v in table.items()}


def coco_id(image_id: str) -> int | None:
    """The COCO image id in an image id string (its trailing digits), or None."""
    match = _TRAILING_DIGITS.search(Path(image_id).stem)
    return int(match.group(1)) if match else None


def load_coco_tags(
    files: list[Path], unnamed: Counter[int] | None = None, renamed: dict[int, str] | None = None
) -> dict[int, list[str]]:
    """COCO image id -> Chinese category names of its objects, largest total area first.

    The areas of an image are summed over all `files`. A category a file names as COCO does (or does not
    name) gets the shipped table's Chinese name; one a file names otherwise (a dataset in COCO's format with
    categories of its own) gets the file's name, recorded in `renamed`. A category that is neither in the
    table nor named by any file has no name: its annotations give no tag (never a made-up one) and are
    counted per category in `unnamed`. Files that name one category id differently are an `InputError`.
    """
    names = category_names("zh")
    english = category_names("name")
    named: dict[int, str] = {}
    areas: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[int, Counter[int]] = defaultdict(Counter)
    for file in files:
        data = _read_json(Path(file))
        conflicts = []
        try:
            for cat in data.get("categories", []):
                if isinstance(cat["name"], str) and cat["name"].strip():  # else: no name (never "None")
                    cid, name = int(cat["id"]), cat["name"].strip()
                    if named.setdefault(cid, name) != name:
                        conflicts.append(f"category {cid} {name!r}, an earlier file {named[cid]!r}")
            for ann in data["annotations"]:
                image, cat = int(ann["image_id"]), int(ann["category_id"])
                areas[image][cat] += float(ann.get("area", 0.0))
                counts[image][cat] += 1
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise InputError(
                f"--coco-instances: {file} is not a COCO instances json ({short_error(err)})"
            ) from err
        if conflicts:
            raise InputError(f"--coco-instances: {file} names {conflicts[0]}")
    for cid, name in named.items():
        if english.get(cid, "").lower() != name.lower():
            names[cid] = name
            if renamed is not None and cid in english:
                renamed[cid] = name
    tags = {}
    for image, per_cat in areas.items():
        ordered = sorted(per_cat.items(), key=lambda kv: (-kv[1], kv[0]))
        if unnamed is not None:
            unnamed.update({cat: counts[image][cat] for cat, _ in ordered if cat not in names})
        image_tags = unique(names[cat] for cat, _ in ordered if cat in names)
        if image_tags:
            tags[image] = image_tags
    return tags


def _read_json(file: Path) -> Any:
    """The parsed `--coco-instances` file; `InputError` naming it when it cannot be read or parsed."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise InputError(f"--coco-instances: file not found: {file}") from err
    except IsADirectoryError as err:
        raise InputError(f"--coco-instances: {file} is a folder, not a COCO instances json") from err
    except OSError as err:
        raise InputError(f"--coco-instances: cannot read {file}: {short_error(err)}") from err
    except json.JSONDecodeError as err:
        raise InputError(
            f"--coco-instances: {file} is not a COCO instances json "
            f"(invalid JSON at line {err.lineno} column {err.colno}: {err.msg})"
        ) from err
    except ValueError as err:
        raise InputError(
            f"--coco-instances: {file} is not a COCO instances json ({short_error(err)})"
        ) from err


@dataclass
class CocoTags:
    """Tags from COCO instances files by COCO image id, and the ids the input's images matched."""

    by_image: dict[int, list[str]]
    matched: set[int] = field(default_factory=set)

    def of(self, image_id: str) -> tuple[str, ...]:
        """The tags of the input's image `image_id` (none when the instances files do not annotate it)."""
        cid = coco_id(image_id)
        if cid is None or cid not in self.by_image:
            return ()
        self.matched.add(cid)
        return tuple(self.by_image[cid])


def chinese_clip_jobs(
    folder: Path,
    split: str,
    coco_tags: CocoTags,
    skips: RecipeSkips,
    keep_uncaptioned: bool = False,
) -> tuple[int, Iterator[ImageJob | Skip]]:
    """(image lines, jobs) for the Chinese-CLIP layout; counts bad text rows and unknown image ids.

    Images that no text names are skipped, or with `keep_uncaptioned` (for an eval set, whose gallery keeps
    them as distractors) passed on without captions.
    """
    imgs, texts = clip_layout_files(folder, split)
    for f in (imgs, texts):
        if not f.is_file():
            raise InputError(f"input file missing: {f} (for --split {split})")
    captions = _captions(texts, skips)
    image_ids, lines = _image_ids(imgs)
    unknown = [i for i in captions if i not in image_ids]
    for image_id in unknown:
        skips.add("unknown image id", len(captions[image_id]), image_id)

    def jobs() -> Iterator[ImageJob | Skip]:
        seen: set[str] = set()
        for index, line in read_lines(imgs):
            if line is None:
                yield line_skip("not UTF-8 image line", index)
                continue
            image_id, _, b64 = line.partition("\t")
            image_id = image_id.strip()
            if not image_id or not b64.strip():
                yield line_skip("malformed image line", index)
            elif image_id in seen:
                yield Skip("duplicate image id", example=image_id)
            elif not captions.get(image_id) and not keep_uncaptioned:
                seen.add(image_id)
                yield Skip("image without captions", example=image_id)
            else:
                seen.add(image_id)
                yield ImageJob(
                    image_id, b64, False, tuple(captions.get(image_id, ())), coco_tags.of(image_id)
                )

    return lines, jobs()


def _captions(texts: Path, skips: RecipeSkips) -> dict[str, list[tuple[str, str]]]:
    """Image id -> `(text_id, text)` of its captions in a `{split}_texts.jsonl`; counts bad lines.

    A line needs a string or integer `text_id`, a string `text` and a non-empty list of string or integer
    `image_ids` (an id listed twice counts once); a line whose `text_id` an earlier line already used is
    skipped, so one id never stands for two texts.
    """
    captions: dict[str, list[tuple[str, str]]] = defaultdict(list)
    text_ids: set[str] = set()
    for index, line in read_lines(texts):
        if line is None:
            skips.add("not UTF-8 text line", example=f"line {index + 1}")
            continue
        try:
            row = json.loads(line)
            text_id, text, image_ids = row["text_id"], row["text"], row["image_ids"]
        except (json.JSONDecodeError, RecursionError, KeyError, TypeError):
            skips.add("malformed text line", example=f"line {index + 1}")
            continue
        if not (_is_id(text_id) and isinstance(text, str) and isinstance(image_ids, list)):
            skips.add("malformed text line", example=f"line {index + 1}")
            continue
        if not all(_is_id(i) for i in image_ids):
            skips.add("malformed text line", example=f"line {index + 1}")
            continue
        text, text_id = text.strip(), str(text_id)
        problem = caption_problem(text)
        if problem:
            skips.add(problem, example=f"line {index + 1}")
        elif not image_ids:
            skips.add("text without image ids", example=f"line {index + 1}")
        elif text_id in text_ids:
            skips.add("duplicate text id", example=f"line {index + 1} ({text_id})")
        else:
            text_ids.add(text_id)
            for image_id in dict.fromkeys(str(i).strip() for i in image_ids):
                captions[image_id].append((text_id, text))
    return captions


def _is_id(value: Any) -> bool:
    """Whether a json value can be an id: a non-blank string or an integer (not a bool)."""
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, int) and not isinstance(value, bool)


def _image_ids(imgs: Path) -> tuple[set[str], int]:
    """The image ids of a `{split}_imgs.tsv` and its number of non-blank lines (undecodable ones included)."""
    ids: set[str] = set()
    lines = 0
    for _, line in read_lines(imgs):
        lines += 1
        if line is not None:
            ids.add(line.partition("\t")[0].strip())
    return ids, lines


def clip_layout_split(path: Path) -> str | None:
    """The split of a file of the Chinese-CLIP layout (`{split}_imgs.tsv` or `{split}_texts.jsonl`, with its
    partner file beside it), or None for any other file."""
    match = _CLIP_FILE.fullmatch(path.name)
    if match is None:
        return None
    split = match.group(1)
    return split if all(f.is_file() for f in clip_layout_files(path.parent, split)) else None


def ernie_rows(tsv: Path, coco_tags: CocoTags):
    """A reader of the 3-column TSV rows (for `group_rows`)."""

    def read() -> Iterator[Row | Skip]:
        for index, line in read_lines(tsv):
            if line is None:
                yield line_skip("not UTF-8 line", index)
                continue
            parts = line.split("\t")
            if len(parts) != 3 or not parts[1].strip():
                yield line_skip("malformed line", index)
                continue
            text, image_id, b64 = parts[0].strip(), parts[1].strip(), parts[2]
            problem = caption_problem(text)
            if problem:
                yield line_skip(problem, index)
                continue
            yield Row(index, image_id, b64, False, text, list(coco_tags.of(image_id)))

    return read


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_recipes.cococn",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_importer_args(parser, "Chinese-CLIP folder or 3-column TSV file")
    parser.add_argument(
        "--coco-instances", type=nonempty_path, action="append", default=[], help="COCO instances json"
    )
    args = parser.parse_args(argv)
    check_input(parser, args.input)
    split = clip_layout_split(args.input) if args.input.is_file() else None
    if split is not None:
        fail(
            parser,
            f"--input {args.input} is one file of the Chinese-CLIP layout: pass its folder "
            f"(--input {args.input.parent} --split {split})",
        )
    check_writer_args(parser, args)
    read = clip_layout_files(args.input, args.split) if args.input.is_dir() else (args.input,)
    check_inputs_kept(parser, args, read)
    skips = RecipeSkips()
    with reported(parser, args.input, args.out):
        unnamed: Counter[int] = Counter()
        renamed: dict[int, str] = {}
        coco_tags = CocoTags(load_coco_tags(args.coco_instances, unnamed, renamed))
        if args.input.is_dir():
            keep = chosen_outputs(args) != "shards"
            total, jobs = chinese_clip_jobs(args.input, args.split, coco_tags, skips, keep_uncaptioned=keep)
            group_by = "text_id"
        else:
            total, jobs = group_rows(ernie_rows(args.input, coco_tags), skips, args.input)
            group_by = "text"
        prepare = partial(prepare_job, max_size=args.max_size)
        print(write_outputs(jobs, prepare, skips, args, total, group_by=group_by, source=args.input))
    if args.coco_instances:
        found = len(coco_tags.matched)
        print(f"{args.split}: tags from COCO instances for {found} of the input's images "
              f"({len(coco_tags.by_image)} annotated in the instances files)")
        if not found:
            print(f"{args.split}: no input image id is annotated in the instances files (another split's "
                  "file?); every sample has no tags", file=sys.stderr)
    if renamed:
        cats = ", ".join(f"{c} {renamed[c]!r}" for c in sorted(renamed)[:SKIP_EXAMPLES])
        print(f"{args.split}: {len(renamed)} categories of the instances files are not COCO's of the same "
              f"id; their tags are the files' own names (first: {cats})")
    if unnamed:
        cats = ", ".join(str(c) for c in sorted(unnamed)[:SKIP_EXAMPLES])
        print(
            f"{args.split}: ignored {sum(unnamed.values())} annotations of {len(unnamed)} categories "
            f"without a name in the table or the instances files (first: {cats})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
