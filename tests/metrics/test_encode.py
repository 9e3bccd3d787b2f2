"""Batched eval-set encoding: batch-size invariance, undecodable images, autocast, and dropping images."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from PIL import Image

from ernievil2_train.metrics.encode import drop_images, encode_images, encode_texts
from ernievil2_train.models import DualEncoder, create_model
from ernievil2_train.text import ErnieTokenizer
from ernievil2_train.vision import eval_transform
from ernievil2_train.vision.transforms import normalize_crops
from tests.metrics.evalset_helpers import CHARS, MAX_LEN, TINY, write_vocab

CPU = torch.device("cpu")
TEXTS = ["红色的猫", "一只狗在车上", "白", "蓝天白色" * 3, "黄色的花", "山水", "黑猫白狗"]


@pytest.fixture(scope="module")
def model() -> DualEncoder:
    torch.manual_seed(0)
    return create_model(TINY).eval()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> ErnieTokenizer:
    return ErnieTokenizer(write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt"), max_len=MAX_LEN)


def png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_texts_encode_as_one_full_batch_would(model: DualEncoder, tokenizer: ErnieTokenizer) -> None:
    """Any batch size gives the float32 rows of one untrimmed batch through the model, in text order."""
    assert set("".join(TEXTS)) <= set(CHARS)
    with torch.no_grad():
        expected = model.encode_text(tokenizer(TEXTS)["input_ids"])
    for batch_size in (1, 3, len(TEXTS), 100):
        got = encode_texts(model, TEXTS, tokenizer, batch_size, CPU)
        assert got.dtype == torch.float32 and got.shape == (len(TEXTS), model.embed_dim)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert not got.requires_grad


def test_no_texts_and_no_images_give_empty_results(model: DualEncoder, tokenizer: ErnieTokenizer) -> None:
    assert encode_texts(model, [], tokenizer, 4, CPU).shape == (0, model.embed_dim)
    transform = eval_transform(model.config.vision.image_size)
    embeddings, valid = encode_images(model, [], transform, 4, CPU)
    assert embeddings.shape == (0, model.embed_dim) and embeddings.dtype == torch.float32
    assert valid.shape == (0,) and valid.dtype == torch.bool


def test_autocast_runs_the_towers_in_low_precision_and_returns_float32(
    model: DualEncoder, tokenizer: ErnieTokenizer
) -> None:
    """Under bfloat16 autocast the rows differ from the float32 ones by rounding only, and are float32."""
    full = encode_texts(model, TEXTS, tokenizer, 4, CPU)
    low = encode_texts(model, TEXTS, tokenizer, 4, CPU, autocast_dtype=torch.bfloat16)
    assert low.dtype == torch.float32
    assert not torch.equal(low, full)
    torch.testing.assert_close(low, full, atol=0.1, rtol=0.05)
    images = [png(40, 30, seed) for seed in range(3)]
    transform = eval_transform(model.config.vision.image_size)
    full_images, _ = encode_images(model, images, transform, 2, CPU)
    low_images, _ = encode_images(model, images, transform, 2, CPU, autocast_dtype=torch.bfloat16)
    assert low_images.dtype == torch.float32 and not torch.equal(low_images, full_images)
    torch.testing.assert_close(low_images, full_images, atol=0.1, rtol=0.05)


def test_a_bfloat16_model_gives_float32_rows(model: DualEncoder, tokenizer: ErnieTokenizer) -> None:
    """Weights stored in bfloat16 (run under bfloat16 autocast) still give float32 embeddings."""
    low = copy.deepcopy(model).to(torch.bfloat16)
    text = encode_texts(low, TEXTS, tokenizer, 4, CPU, autocast_dtype=torch.bfloat16)
    transform = eval_transform(model.config.vision.image_size)
    image, _ = encode_images(low, [png(40, 30, 0)], transform, 4, CPU, autocast_dtype=torch.bfloat16)
    assert text.dtype == image.dtype == torch.float32
    assert text.shape == (len(TEXTS), model.embed_dim) and image.shape == (1, model.embed_dim)


def test_undecodable_images_are_flagged_not_fatal(model: DualEncoder) -> None:
    """Corrupt bytes, an empty string and an image over the pixel limit are marked invalid and get the
    black image's row; the others get their own rows, whatever the batch boundaries."""
    size = model.config.vision.image_size
    transform = eval_transform(size, max_pixels=60 * 60)
    good = [png(50, 40, 1), png(size, size, 2), png(33, 57, 3)]
    images = [good[0], good[1][:50], good[1], b"", png(70, 70, 4), good[2]]
    with torch.no_grad():
        expected_good = model.encode_image(torch.stack([transform(b) for b in good]))
        zero_row = model.encode_image(normalize_crops(torch.zeros(1, 3, size, size, dtype=torch.uint8)))
    for batch_size in (1, 4):
        embeddings, valid = encode_images(model, images, transform, batch_size, CPU)
        assert valid.tolist() == [True, False, True, False, False, True]
        assert embeddings.dtype == torch.float32 and embeddings.shape == (len(images), model.embed_dim)
        torch.testing.assert_close(embeddings[valid], expected_good, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(embeddings[~valid], zero_row.expand(3, -1), atol=1e-5, rtol=1e-5)


def test_progress_bars_only_when_asked(model: DualEncoder, tokenizer: ErnieTokenizer,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    transform = eval_transform(model.config.vision.image_size)
    encode_texts(model, TEXTS, tokenizer, 4, CPU)
    encode_images(model, [png(20, 20, 0)], transform, 4, CPU)
    assert capsys.readouterr().err == ""
    encode_texts(model, TEXTS, tokenizer, 4, CPU, progress=True)
    encode_images(model, [png(20, 20, 0)], transform, 4, CPU, progress=True)
    err = capsys.readouterr().err
    assert "encode texts" in err and "encode images" in err


@pytest.mark.parametrize(
    ("valid", "kept", "positives"),
    [
        ([True, True, True, True], [0, 1, 2, 3], [[0, 2], [1], [3, 1], [2]]),
        ([True, False, True, True], [0, 2, 3], [[0, 1], [2], [1]]),
        ([False, True, False, True], [1, 2], [[0], [1, 0]]),
        ([False, False, False, False], [], []),
    ],
    ids=["all-valid", "one-invalid", "texts-left-without-image", "none-valid"],
)
def test_drop_images_reindexes_positives(valid: list[bool], kept: list[int],
                                         positives: list[list[int]]) -> None:
    """Invalid images leave the ground truth, the rest are renumbered in order, and texts left without a
    positive are dropped (their indices are not in `kept`)."""
    text_to_images = [[0, 2], [1], [3, 1], [2]]
    assert drop_images(text_to_images, valid) == (kept, positives)
