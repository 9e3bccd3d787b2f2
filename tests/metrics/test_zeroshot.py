"""`ZeroShotRetrieval`: rows gathered by index (any split over processes), both protocols, bad indices."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ernievil2_train.metrics.retrieval import any_positive, ernie_protocol
from ernievil2_train.metrics.zeroshot import ZeroShotRetrieval
from tests.ddp_helpers import run_ranks
from tests.metrics.test_retrieval import many_to_many, quantised


def eval_data() -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    rng = np.random.default_rng(5)
    text, image = quantised(rng, 23), quantised(rng, 11)
    return torch.from_numpy(text), torch.from_numpy(image), many_to_many(rng, 23, 11)


def update_slices(metric: ZeroShotRetrieval, rank: int, world: int) -> None:
    """Uneven strided slices, in two batches, with one item repeated by the next rank (padding-like)."""
    text, image, _ = eval_data()
    t_idx = [*range(rank, text.shape[0], world), (rank + 1) % text.shape[0]]
    i_idx = list(range(rank, image.shape[0], world))
    for part in (t_idx[:3], t_idx[3:]):
        metric.update(text_emb=text[part], text_idx=torch.tensor(part))
    metric.update(image_emb=image[i_idx], image_idx=torch.tensor(i_idx))


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _, _, gt = eval_data()
        metric = ZeroShotRetrieval(gt, num_images=11, chunk_size=4)
        update_slices(metric, rank, world)
        result = metric.compute()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(result, fh)
    finally:
        dist.destroy_process_group()


def test_metric_identical_with_one_and_two_processes(tmp_path):
    text, image, gt = eval_data()
    direct = any_positive(text, image, gt, device="cpu")
    single = ZeroShotRetrieval(gt, num_images=11)
    update_slices(single, 0, 1)
    assert single.compute() == direct
    run_ranks(_worker, 2, (str(tmp_path),), timeout_s=120)
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == direct


def test_metric_row_paired_and_missing_items():
    text, image, _ = eval_data()
    metric = ZeroShotRetrieval(num_texts=11, num_images=11, protocol="ernie")
    metric.update(text_emb=text[:11], text_idx=torch.arange(11), image_emb=image, image_idx=torch.arange(11))
    assert metric.compute() == ernie_protocol(text[:11], image, device="cpu")
    partial = ZeroShotRetrieval(num_texts=11, num_images=11, protocol="ernie")
    partial.update(text_emb=text[:5], text_idx=torch.arange(5), image_emb=image, image_idx=torch.arange(11))
    with pytest.raises(ValueError, match="5 of 11"):
        partial.compute()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text_to_images": [[0]], "protocol": "dense"},
         "protocol must be 'any_positive' or 'ernie', got 'dense'"),
        ({"num_texts": 3, "num_images": 3}, "protocol 'any_positive' needs text_to_images"),
        ({"text_to_images": [[0]], "chunk_size": -1}, "chunk_size must be a positive integer, got -1"),
    ],
)
def test_bad_protocol_arguments_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ZeroShotRetrieval(**kwargs)


def test_rows_come_back_in_index_order_without_repeats() -> None:
    """Batches in any order, a row sent twice (padding), half-precision rows and list indices: `embeddings`
    gives float32 rows sorted by index, each once."""
    text, image, gt = eval_data()
    metric = ZeroShotRetrieval(gt)
    order = torch.randperm(text.shape[0], generator=torch.Generator().manual_seed(0)).tolist()
    for part in (order[:9], order[9:], order[:2]):
        metric.update(text_emb=text[part].double(), text_idx=part)
    metric.update(image_emb=image[6:].half(), image_idx=torch.arange(6, 11))
    metric.update(image_emb=image[:6].half(), image_idx=list(range(6)))
    got_text, got_image = metric.embeddings()
    assert got_text.dtype == got_image.dtype == torch.float32
    assert torch.equal(got_text, text) and torch.equal(got_image, image)


def test_set_sizes_default_to_the_largest_index() -> None:
    """Without `num_texts` / `num_images` the set is 0..largest index; a gap in it is an error."""
    text, image, _ = eval_data()
    metric = ZeroShotRetrieval(protocol="ernie")
    metric.update(text_emb=text[:7], text_idx=torch.arange(7), image_emb=image[:7], image_idx=torch.arange(7))
    assert metric.compute() == ernie_protocol(text[:7], image[:7], device="cpu")
    gap = ZeroShotRetrieval(protocol="ernie")
    gap.update(text_emb=text[:3], text_idx=torch.tensor([0, 1, 3]), image_emb=image[:4],
               image_idx=torch.arange(4))
    with pytest.raises(ValueError, match=r"^texts: received indices for 3 of 4 items$"):
        gap.embeddings()


@pytest.mark.parametrize("indices", [[0, 1, 3], [-1, 1, 2]], ids=["past-the-end", "negative"])
def test_indices_outside_the_set_are_refused(indices: list[int]) -> None:
    """As many distinct indices as items, but not 0..n-1: the metric refuses instead of scoring them."""
    text, image, _ = eval_data()
    metric = ZeroShotRetrieval(num_texts=3, num_images=3, protocol="ernie")
    metric.update(text_emb=text[:3], text_idx=torch.arange(3), image_emb=image[:3],
                  image_idx=torch.tensor(indices))
    with pytest.raises(ValueError, match=r"^images: received indices for 3 of 3 items$"):
        metric.compute()


def test_ernie_protocol_pairs_each_text_with_its_first_listed_image() -> None:
    text, image, _ = eval_data()
    text_to_images = [[(5 * t + 2) % 11, t % 11] for t in range(text.shape[0])]
    metric = ZeroShotRetrieval(text_to_images, protocol="ernie")
    metric.update(text_emb=text, text_idx=torch.arange(text.shape[0]), image_emb=image,
                  image_idx=torch.arange(11))
    paired = image[[p[0] for p in text_to_images]]
    assert metric.compute() == ernie_protocol(text, paired, device="cpu")


def test_any_positive_takes_the_number_of_texts_from_the_ground_truth() -> None:
    """`num_texts` is the length of `text_to_images`, so a text no process sent is an error."""
    text, image, gt = eval_data()
    metric = ZeroShotRetrieval(gt, num_texts=5)
    metric.update(text_emb=text[:-1], text_idx=torch.arange(text.shape[0] - 1), image_emb=image,
                  image_idx=torch.arange(11))
    with pytest.raises(ValueError, match=rf"^texts: received indices for {len(gt) - 1} of {len(gt)} items$"):
        metric.compute()


def test_reset_forgets_the_previous_epoch() -> None:
    text, image, gt = eval_data()
    metric = ZeroShotRetrieval(gt)
    metric.update(text_emb=-text, text_idx=torch.arange(text.shape[0]), image_emb=image,
                  image_idx=torch.arange(11))
    metric.compute()
    metric.reset()
    metric.update(text_emb=text, text_idx=torch.arange(text.shape[0]), image_emb=image,
                  image_idx=torch.arange(11))
    assert metric.compute() == any_positive(text, image, gt, device="cpu")
