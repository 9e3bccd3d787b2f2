"""Batches as the loader workers put them together, and the skip counts each one carries.

Bad data never stops the stream: every failure is counted per reason (`SKIP_REASONS`) in the worker process
where it happens, by the same `SkipCounter` the collate of that worker uses, and each batch carries
`batch["skipped"]`: LongTensor[len(SKIP_REASONS)], the skips that worker saw since its previous batch.
Summing `batch["skipped"]` over an epoch (and over ranks) gives the epoch's skip counts, whatever the number
of workers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import torch

from ernievil2_train.data.decode import SKIP_REASONS, SkipSample
from ernievil2_train.models.text import padded_length
from ernievil2_train.vision.augment import normalize_uint8

log = logging.getLogger(__name__)

SKIPPED_KEY = "skipped"
IMAGE_KEYS = ("image", "image_view2")
TEXT_ID_KEYS = ("caption_ids", "text_view_ids", "tag_ids")
_LOGGED_PER_REASON = 5


class SkipCounter:
    """Per-process skip counts; used as the webdataset exception handler (warn, count, continue).
    `replaying`, when set, tells when the stream is reading again what a resumed run trained before its
    checkpoint: what is met there was counted then, and is not counted again."""

    def __init__(self) -> None:
        self.pending = [0] * len(SKIP_REASONS)
        self.total = [0] * len(SKIP_REASONS)
        self.replaying: Callable[[], bool] | None = None

    def count(self, reason: str, message: str, samples: int = 1) -> None:
        if self.replaying is not None and self.replaying():
            return
        index = SKIP_REASONS.index(reason)
        logged = self.total[index] < _LOGGED_PER_REASON
        self.pending[index] += samples
        self.total[index] += samples
        if logged:
            log.warning("skipped a sample (%s): %s", reason, message)

    def tar_handler(self, exn: Exception) -> bool:
        """Handler for grouping tar members into samples: counted as a bad tar (`read_shards` has already
        left out samples with a duplicate member)."""
        self.count("bad_tar", f"{type(exn).__name__}: {exn}")
        return True

    def sample_handler(self, exn: Exception) -> bool:
        """Handler for the decode/views stage: `SkipSample` carries its reason, anything else is 'other'."""
        if isinstance(exn, SkipSample):
            self.count(exn.reason, str(exn))
        else:
            self.count("other", f"{type(exn).__name__}: {exn}")
        return True

    def take(self) -> torch.Tensor:
        """Counts since the previous call, as LongTensor[len(SKIP_REASONS)]."""
        counts = torch.tensor(self.pending, dtype=torch.long)
        self.pending = [0] * len(SKIP_REASONS)
        return counts


class Collate:
    """Stack per-sample tensors into a batch dict and attach this worker's pending skip counts."""

    def __init__(self, counter: SkipCounter) -> None:
        self.counter = counter

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0] if key != "__key__"}
        batch[SKIPPED_KEY] = self.counter.take()
        return trim_text_ids(batch)


def trim_text_ids(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut every text-id tensor of a host batch to one common length: the longest real row, rounded up to 8.

    Done here, on the host, so the training step never has to read the length back from the device; the
    text views keep one length, so they still encode in one call.
    """
    keys = [key for key in TEXT_ID_KEYS if key in batch]
    if keys:
        length = padded_length(*(batch[key] for key in keys))
        batch.update({key: batch[key][:, :length] for key in keys})
    return batch


def normalize_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """uint8 `image` / `image_view2` -> normalised float32 (the agreed batch format); float ones unchanged."""
    for key in IMAGE_KEYS:
        if key in batch and batch[key].dtype == torch.uint8:
            batch[key] = normalize_uint8(batch[key])
    return batch


def with_final_skips(src: Iterable[dict[str, torch.Tensor]], counter: SkipCounter) -> Iterator[dict]:
    """The batches of `src`, then `{SKIPPED_KEY: counts}` if samples were skipped after the last one."""
    yield from src
    pending = counter.take()
    if pending.any():
        yield {SKIPPED_KEY: pending}
