"""Feature-cache gradient accumulation: a contrastive loss over k micro-batches with the memory of one.

1. Encode each micro-batch without grad (recording the RNG state first), keep the features.
2. Compute the loss over ALL cached features (they are leaves that require grad): feature gradients and
   the gradients of the loss-level parameters (temperatures), without touching `.grad`.
3. Re-encode each micro-batch with grad, replaying its RNG state so dropout / drop-path draw the same masks,
   and backpropagate `sum(features * feature_grad)` (features of a frozen tower are not re-encoded: no
   parameter would get a gradient from them); the last micro-batch also carries
   `sum(param * param_grad)` for the temperatures, so everything lands in ONE synchronised backward.
   Every backward but the last runs under `no_sync` (no DDP all-reduce).
The parameter gradients equal those of the loss on the whole batch computed in one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch

from ernievil2_train.models.dual_encoder import float32_or_wider


@dataclass
class RngState:
    """CPU and (when present) current-CUDA-device generator states."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    cuda_device: int | None

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            return cls(torch.get_rng_state(), torch.cuda.get_rng_state(index), index)
        return cls(torch.get_rng_state(), None, None)

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state; the generators are restored afterwards."""
        devices = [self.cuda_device] if self.cuda_device is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.cuda_device)
            yield


Batch = dict[str, torch.Tensor]


def split_batch(batch: Batch, k: int, per_sample: set[str]) -> list[Batch]:
    """k micro-batches of equal size from the per-sample entries of `batch`."""
    size = next(batch[key].shape[0] for key in per_sample if key in batch)
    if size % k:
        raise ValueError(f"batch size {size} is not divisible by accumulate_microbatches={k}")
    chunks = {key: value.chunk(k, dim=0) for key, value in batch.items() if key in per_sample}
    return [{key: parts[i] for key, parts in chunks.items()} for i in range(k)]


def feature_cache_step(
    micro_batches: list[dict[str, torch.Tensor]],
    encode: Callable[[dict[str, torch.Tensor], list[str] | None], dict[str, torch.Tensor]],
    compute_loss: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    loss_params: list[torch.nn.Parameter],
    backward: Callable[[torch.Tensor], None],
    no_sync: Callable[[], AbstractContextManager] = nullcontext,
    device: torch.device | None = None,
    frozen_features: frozenset[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """Accumulate the gradient of `compute_loss(cat(encode(mb) for mb))` into `.grad`; returns the loss dict.

    encode: (micro-batch, feature names or None for all) -> raw features; compute_loss: concatenated raw
    features -> {"loss", ...}; loss_params: parameters used by compute_loss directly (temperatures);
    backward: e.g. `manual_backward`; frozen_features: features whose encoder has no trainable parameter.
    """
    device = device or next(iter(micro_batches[0].values())).device
    states, cached = [], []
    for mb in micro_batches:
        states.append(RngState.capture(device))
        with torch.no_grad():
            cached.append(encode(mb, None))
    names = list(cached[0])
    replayed = [n for n in names if n not in frozen_features]
    leaves = {n: float32_or_wider(torch.cat([c[n] for c in cached])).requires_grad_(True) for n in names}
    out = compute_loss(leaves)
    params = [p for p in loss_params if p.requires_grad]
    grads = torch.autograd.grad(out["loss"], [leaves[n] for n in names] + params, allow_unused=True)
    by_name = dict(zip(names, grads[: len(names)], strict=True))
    feature_grads = {n: by_name[n].chunk(len(micro_batches)) for n in replayed}
    param_terms = [(p, g) for p, g in zip(params, grads[len(names) :], strict=True) if g is not None]
    for i, (mb, state) in enumerate(zip(micro_batches, states, strict=True)):
        last = i == len(micro_batches) - 1
        with nullcontext() if last else no_sync():
            with state.replay():
                feats = encode(mb, replayed)
            surrogate = sum((feats[n].to(g[i].dtype) * g[i]).sum() for n, g in feature_grads.items())
            if last:
                surrogate = surrogate + sum((p * g).sum() for p, g in param_terms)
            backward(surrogate)
    return {k: v.detach() for k, v in out.items()}
