from __future__ import annotations

import pytest
import torch

from ernievil2_train.models import DualEncoder, DualEncoderConfig, create_model, memory
from ernievil2_train.models.memory import available_memory, check_fits_in_memory, model_bytes, weight_bytes
from tests.models.tiny import TINY


def _config(vision_layers: int, text_layers: int) -> DualEncoderConfig:
    config = DualEncoderConfig.from_dict(TINY)
    config.vision.layers, config.text.layers = vision_layers, text_layers
    return config


@pytest.mark.parametrize(("vision_layers", "text_layers"), [(1, 1), (3, 1), (1, 4), (5, 3)])
def test_model_bytes_counts_every_weight_of_the_real_model(vision_layers: int, text_layers: int) -> None:
    config = _config(vision_layers, text_layers)
    real = DualEncoder(config)
    expected = sum(t.numel() * t.element_size() for t in [*real.parameters(), *real.buffers()])
    assert model_bytes(config) == expected
    with torch.device("meta"):
        assert weight_bytes(DualEncoder(config)) == expected


def test_available_memory_is_a_positive_byte_count() -> None:
    available = available_memory()
    assert isinstance(available, int) and available > 0


def test_weights_beyond_the_available_memory_are_refused_naming_the_sizes(monkeypatch) -> None:
    config = _config(2, 2)
    needed = model_bytes(config)
    monkeypatch.setattr(memory, "available_memory", lambda: needed - 1)
    with pytest.raises(ValueError, match=r"need .* GiB, more than .*vision\.image_size=32, .*text\.layers=2"):
        check_fits_in_memory(config)
    monkeypatch.setattr(memory, "available_memory", lambda: needed)
    check_fits_in_memory(config)
    monkeypatch.setattr(memory, "available_memory", lambda: None)  # unknown: nothing is refused
    check_fits_in_memory(config)


def test_a_mistyped_image_size_is_refused_before_any_allocation() -> None:
    """100 000 x 100 000 patches of position embeddings: terabytes, on any machine."""
    patch = TINY["vision"]["patch_size"]
    with pytest.raises(ValueError, match=f"vision.image_size={patch * 100_000}"):
        create_model(TINY, vision={"image_size": patch * 100_000})
