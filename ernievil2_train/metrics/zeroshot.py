"""A torchmetrics `Metric` that gathers eval embeddings across processes and scores them once."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ernievil2_train.metrics.retrieval import (
    DEFAULT_CHUNK_SIZE,
    any_positive,
    check_chunk_size,
    ernie_protocol,
)


def _rows_by_index(emb: Tensor, index: Tensor, expected: int, what: str) -> Tensor:
    """Order gathered rows by their global index, dropping duplicates (padding from uneven splits)."""
    index_np = index.cpu().numpy()
    values, first = np.unique(index_np, return_index=True)
    if values.size != expected or (expected and (values[0] != 0 or values[-1] != expected - 1)):
        raise ValueError(f"{what}: received indices for {values.size} of {expected} items")
    return emb[torch.as_tensor(first, device=emb.device)]


class ZeroShotRetrieval(Metric):
    """Accumulates text/image embeddings with their global indices and evaluates once over the whole set.

    States are concatenated across processes on sync, then ordered and de-duplicated by index, so the result
    does not depend on how items were split over ranks. protocol `any_positive` uses `text_to_images`;
    `ernie` pairs text i with image `text_to_images[i][0]` (or image i when `text_to_images` is None).
    """

    full_state_update = False

    def __init__(
        self,
        text_to_images: Sequence[Sequence[int]] | None = None,
        num_texts: int | None = None,
        num_images: int | None = None,
        protocol: str = "any_positive",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if protocol not in ("any_positive", "ernie"):
            raise ValueError(f"protocol must be 'any_positive' or 'ernie', got {protocol!r}")
        if protocol == "any_positive" and text_to_images is None:
            raise ValueError("protocol 'any_positive' needs text_to_images")
        self.text_to_images = [list(p) for p in text_to_images] if text_to_images is not None else None
        self.num_texts = len(self.text_to_images) if self.text_to_images is not None else num_texts
        self.num_images = num_images
        self.protocol = protocol
        check_chunk_size(chunk_size)
        self.chunk_size = chunk_size
        for name in ("text_emb", "text_idx", "image_emb", "image_idx"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        text_emb: Tensor | None = None,
        text_idx: Tensor | None = None,
        image_emb: Tensor | None = None,
        image_idx: Tensor | None = None,
    ) -> None:
        """Add a batch of text and/or image embeddings with their indices into the eval set."""
        if text_emb is not None:
            self.text_emb.append(text_emb.detach().float())
            self.text_idx.append(torch.as_tensor(text_idx, device=text_emb.device, dtype=torch.long))
        if image_emb is not None:
            self.image_emb.append(image_emb.detach().float())
            self.image_idx.append(torch.as_tensor(image_idx, device=image_emb.device, dtype=torch.long))

    def embeddings(self) -> tuple[Tensor, Tensor]:
        """Accumulated text and image embeddings (this process's, or all after a sync), ordered by index."""
        text_idx, image_idx = dim_zero_cat(self.text_idx), dim_zero_cat(self.image_idx)
        num_texts = self.num_texts if self.num_texts is not None else int(text_idx.max()) + 1
        num_images = self.num_images if self.num_images is not None else int(image_idx.max()) + 1
        text = _rows_by_index(dim_zero_cat(self.text_emb), text_idx, num_texts, "texts")
        image = _rows_by_index(dim_zero_cat(self.image_emb), image_idx, num_images, "images")
        return text, image

    def score(self, text: Tensor, image: Tensor) -> dict[str, float]:
        """Metrics for complete, ordered embeddings (see `embeddings`)."""
        kw = {"chunk_size": self.chunk_size, "device": text.device}
        if self.protocol == "any_positive":
            return any_positive(text, image, self.text_to_images, **kw)
        if self.text_to_images is not None:
            image = image[torch.tensor([p[0] for p in self.text_to_images], device=image.device)]
        return ernie_protocol(text, image, **kw)

    def compute(self) -> dict[str, float]:
        return self.score(*self.embeddings())
