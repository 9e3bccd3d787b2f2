"""Batched encoding of eval-set texts and images with a dual encoder (no grad, optional autocast)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ernievil2_train.models.text import trim_padding
from ernievil2_train.stopping import ignore_stop_signals
from ernievil2_train.vision.transforms import EvalTransform, normalize_crops

if TYPE_CHECKING:
    from ernievil2_train.models.dual_encoder import DualEncoderConfig


class Encoder(Protocol):
    """What encoding needs of a model: a `DualEncoder`, or a wrapper such as the retrieval callback's."""

    @property
    def config(self) -> DualEncoderConfig: ...

    @property
    def embed_dim(self) -> int: ...

    def encode_image(self, pixels: Tensor, /) -> Tensor: ...

    def encode_text(self, input_ids: Tensor, /) -> Tensor: ...


class _Crops(Dataset):
    """Images as uint8 crops; an undecodable one yields zeros and `ok=False` instead of failing the run."""

    def __init__(self, images: Sequence[bytes], transform: EvalTransform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, bool]:
        try:
            return self.transform.crop(self.images[i]), True
        except ValueError:
            size = self.transform.image_size
            return torch.zeros(3, size, size, dtype=torch.uint8), False


CropBatches = Iterable[tuple[Tensor, Tensor]]  # uint8 [b, 3, S, S] crops and their bool `ok` marks


def image_crops(images: Sequence[bytes], transform: EvalTransform, batch_size: int,
                num_workers: int = 0) -> CropBatches:
    """Batches of the images' crops before normalisation, decoded by `num_workers` loader workers. The
    loader draws its seed from a generator of its own: an evaluation leaves torch's random stream (the
    training's dropout masks) as it was, whether it decodes or reads a cache."""
    return DataLoader(_Crops(images, transform), batch_size=batch_size, num_workers=num_workers,
                      worker_init_fn=ignore_stop_signals, generator=torch.Generator())


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def encode_texts(
    model: Encoder,
    texts: Sequence[str],
    tokenizer: Callable[[list[str]], dict[str, Tensor]],
    batch_size: int,
    device: torch.device,
    *,
    progress: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """Float32 `[len(texts), D]` text embeddings (not normalized), on `device`."""
    out = []
    with tqdm(total=len(texts), desc="encode texts", unit="txt", disable=not progress, leave=False) as bar:
        for start in range(0, len(texts), batch_size):
            ids = trim_padding(tokenizer(list(texts[start : start + batch_size]))["input_ids"]).to(device)
            with _autocast(device, autocast_dtype):
                out.append(model.encode_text(ids).float())
            bar.update(ids.shape[0])
    return torch.cat(out) if out else torch.empty(0, model.embed_dim, device=device)


@torch.no_grad()
def encode_images(
    model: Encoder,
    images: Sequence[bytes],
    transform: EvalTransform,
    batch_size: int,
    device: torch.device,
    *,
    progress: bool = False,
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Float32 `[len(images), D]` image embeddings (not normalized) on `device`, and a bool mask of the
    images that decoded (rows of undecodable images are meaningless and must be dropped)."""
    with tqdm(total=len(images), desc="encode images", unit="img", disable=not progress, leave=False) as bar:
        return encode_crops(model, image_crops(images, transform, batch_size, num_workers), device,
                            autocast_dtype=autocast_dtype, on_batch=bar.update)


@torch.no_grad()
def encode_crops(
    model: Encoder,
    batches: CropBatches,
    device: torch.device,
    *,
    autocast_dtype: torch.dtype | None = None,
    on_batch: Callable[[int], object] | None = None,
) -> tuple[Tensor, Tensor]:
    """`encode_images` of crop batches: normalised on `device` (the uint8 crops are what travels there)."""
    out, valid = [], []
    for crops, ok in batches:
        pixels = normalize_crops(crops.to(device, non_blocking=True))
        with _autocast(device, autocast_dtype):
            out.append(model.encode_image(pixels).float())
        valid.append(ok)
        if on_batch is not None:
            on_batch(len(crops))
    if not out:
        return torch.empty(0, model.embed_dim, device=device), torch.empty(0, dtype=torch.bool)
    return torch.cat(out), torch.cat(valid)


def drop_images(
    text_to_images: Sequence[Sequence[int]], valid: Sequence[bool]
) -> tuple[list[int], list[list[int]]]:
    """Ground truth without the invalid images: (kept text indices, their positives re-indexed)."""
    new_index, count = [], 0
    for ok in valid:
        new_index.append(count if ok else -1)
        count += bool(ok)
    kept, positives = [], []
    for t, pos in enumerate(text_to_images):
        remaining = [new_index[i] for i in pos if new_index[i] >= 0]
        if remaining:
            kept.append(t)
            positives.append(remaining)
    return kept, positives
