"""Generic image-caption importer: a TSV or JSONL file to shards and/or an eval set.

TSV lines: `image<TAB>caption[<TAB>tags]`, tags comma-separated ("," or "，").
JSONL lines: `{"image", "caption", "tags": [...] or "a,b", "image_id"}` (tags and image_id optional).

`image` is a file path (relative to the input file's folder, or absolute) or the base64-encoded image; a value
of 64+ characters from the base64 alphabet without a "." is taken as base64 unless a file of that name exists
(content-addressed layouts name files by their hash, without extension). Captions are grouped by image id:
`image_id` when given (any JSON number or string, `0` included), else the path as written, else `b64-` + a
hash of the base64 text. An image's tags are the union of its rows' tags; a row whose image id was first seen
with another image is skipped ("conflicting image for id"). Text ids are the 0-based line numbers. Lines that
are not UTF-8 or not in this layout (an image id with a tab or a line break included, a path with a NUL, a
carriage return inside a TSV line, as files with old Mac line ends have), and captions without text (only
whitespace, control or format characters), are skipped and counted; a run that writes nothing, or an input in
UTF-16, is an error (exit status 2).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from data_recipes.common import (
    Row,
    caption_problem,
    group_rows,
    line_skip,
    prepare_job,
    read_lines,
    split_tags,
    unique,
)
from data_recipes.options import (
    add_importer_args,
    check_input,
    check_inputs_kept,
    check_writer_args,
    reported,
)
from data_recipes.shards import (
    RecipeSkips,
    Skip,
    write_outputs,
)

_BASE64 = re.compile(r"[A-Za-z0-9+/=_-]{64,}")
_DATA_URI = re.compile(r"data:image/[\w.+-]+;base64,")  # what a browser or a notebook writes
LONGEST_PATH = 4096  # Linux's PATH_MAX: a longer value is no file name


def looks_like_base64(value: str) -> bool:
    return "." not in value and _BASE64.fullmatch(value) is not None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the file system: base64 text
        return False


def _row(
    index: int, base: Path, image: str, caption: str, tags: list[str], image_id: str | None
) -> Row | Skip:
    image, caption = image.strip(), caption.strip()
    unwrapped = "".join(image.split())  # MIME base64 (a JSONL string) breaks its text into lines
    if unwrapped != image and looks_like_base64(unwrapped):
        image = unwrapped
    uri = _DATA_URI.match(image)
    if uri:
        image = image[uri.end():]
    if not image or "\0" in image:
        return line_skip("malformed line", index)
    problem = caption_problem(caption)
    if problem:
        return line_skip(problem, index)
    if len(image) > LONGEST_PATH and not looks_like_base64(image):
        return line_skip("bad base64 image", index)  # a character outside base64 in the text
    if looks_like_base64(image) and not _is_file(base / image):
        source, is_path = image, False
        default_id = "b64-" + hashlib.blake2b(image.encode("ascii"), digest_size=8).hexdigest()
    else:
        source, is_path, default_id = str(base / image), True, os.path.normpath(image)  # ./a.jpg is a.jpg
    image_id = default_id if image_id is None else image_id
    if not _usable_id(image_id):
        return line_skip("malformed line", index)
    return Row(index, image_id, source, is_path, caption, tags)


def _usable_id(image_id: str) -> bool:
    """Whether an image id can be written: not blank and without tabs or line breaks (the eval set's
    `image_id<TAB>base64` lines could not hold them)."""
    return bool(image_id.strip()) and not any(c in image_id for c in "\t\n\r")


def tsv_rows(path: Path) -> Callable[[], Iterator[Row | Skip]]:
    def read() -> Iterator[Row | Skip]:
        for index, line in read_lines(path):
            if line is None:
                yield line_skip("not UTF-8 line", index)
                continue
            if "\r" in line:  # old Mac line ends: several rows read as one, a caption running into a path
                yield line_skip("carriage return inside a line", index)
                continue
            parts = line.split("\t")
            if len(parts) not in (2, 3):
                yield line_skip("malformed line", index)
                continue
            tags = split_tags(parts[2]) if len(parts) == 3 else []
            yield _row(index, path.parent, parts[0], parts[1], tags, None)

    return read


def _json_row(index: int, base: Path, line: str) -> Row | Skip:
    """A JSONL line as a row: `image` a string, `caption` a string (or null: empty), `tags` a string or a list
    of strings, `image_id` a string or a number; anything else is a malformed line."""
    try:
        obj = json.loads(line)
        image, caption = obj["image"], obj.get("caption")
        tags, image_id = obj.get("tags"), obj.get("image_id")
    except (json.JSONDecodeError, RecursionError, KeyError, TypeError, AttributeError):
        return line_skip("malformed line", index)
    tags = [] if tags is None else tags
    good_tags = isinstance(tags, str) or (isinstance(tags, list) and all(isinstance(t, str) for t in tags))
    good_id = image_id is None or isinstance(image_id, str) or _is_number(image_id)
    if not (isinstance(image, str) and isinstance(caption, (str, type(None))) and good_tags and good_id):
        return line_skip("malformed line", index)
    tags = split_tags(tags) if isinstance(tags, str) else unique(t.strip() for t in tags)
    image_id = None if image_id is None else str(image_id).strip() or None
    return _row(index, base, image, caption or "", tags, image_id)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def jsonl_rows(path: Path) -> Callable[[], Iterator[Row | Skip]]:
    def read() -> Iterator[Row | Skip]:
        for index, line in read_lines(path):
            if line is None:
                yield line_skip("not UTF-8 line", index)
            else:
                yield _json_row(index, path.parent, line)

    return read


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_recipes.tsv",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_importer_args(parser, "a .tsv file or a .jsonl file")
    args = parser.parse_args(argv)
    check_input(parser, args.input, file_only=True)
    check_writer_args(parser, args)
    check_inputs_kept(parser, args, [args.input])
    reader = jsonl_rows if args.input.suffix.lower() in (".jsonl", ".json") else tsv_rows
    skips = RecipeSkips()
    with reported(parser, args.input, args.out):
        total, jobs = group_rows(reader(args.input), skips, args.input)
        prepare = partial(prepare_job, max_size=args.max_size)
        print(write_outputs(jobs, prepare, skips, args, total, group_by="text", source=args.input))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
