"""Retrieval metrics (chunked, two protocols) and the distributed `ZeroShotRetrieval` metric."""

from __future__ import annotations

from ernievil2_train.metrics.retrieval import any_positive, ernie_protocol

__all__ = ["ZeroShotRetrieval", "any_positive", "ernie_protocol"]


def __getattr__(name: str):
    # Lazy: torchmetrics is slow to import and the evaluate CLI does not need it.
    if name == "ZeroShotRetrieval":
        from ernievil2_train.metrics.zeroshot import ZeroShotRetrieval

        return ZeroShotRetrieval
    raise AttributeError(f"module 'ernievil2_train.metrics' has no attribute {name!r}")
