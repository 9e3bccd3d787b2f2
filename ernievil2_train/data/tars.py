"""Reading a tar stream to its end: `tarfile` alone cannot tell a truncated or damaged tar from a whole one.
Standard library only, so the eval-set reader (and the recipes through it) stay free of torch."""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from typing import Any

META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's own bookkeeping members, not sample files


class _EndRecordingTarInfo(tarfile.TarInfo):
    """Records on its `TarFile` why reading headers stopped. Past the first member, `tarfile` takes a
    missing (truncated file) or damaged (corrupt) header for the end of the archive, as it does its
    end-of-archive marker; only this record tells them apart."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as err:
            tar.stopped_by = err  # type: ignore[attr-defined]
            raise


def tar_members(stream: Any) -> Iterator[dict[str, Any]]:
    """The regular files of a tar stream as `{"fname", "data"}`; `tarfile.ReadError` when the stream ends
    anywhere but at the end-of-archive marker (a truncated or corrupt tar: its later samples are lost)."""
    with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndRecordingTarInfo) as tar:
        for info in tar:
            if info.isreg() and not META_MEMBER.match(info.name):
                yield {"fname": info.name, "data": tar.extractfile(info).read()}
            tar.members = []  # a stream is read once: keep no list of members
    stopped = getattr(tar, "stopped_by", None)
    if not isinstance(stopped, tarfile.EOFHeaderError):
        raise tarfile.ReadError(f"no end-of-archive marker after byte {tar.offset} ({stopped}): truncated or "
                                "corrupt")
