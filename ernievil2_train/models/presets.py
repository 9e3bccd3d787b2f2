"""Named architectures and the `create_model` factory."""

from __future__ import annotations

from typing import Any

from ernievil2_train.models.dual_encoder import DualEncoder, DualEncoderConfig
from ernievil2_train.models.memory import check_fits_in_memory

_ERNIE_TEXT = {"vocab_size": 40000, "max_position_embeddings": 2048}

PRESETS: dict[str, dict[str, Any]] = {
    "ernie_vil2_base": {
        "vision": {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12, "heads": 12},
        "text": {**_ERNIE_TEXT, "width": 768, "layers": 12, "heads": 12, "intermediate_size": 3072},
    },
    "ernie_vil2_large": {
        "vision": {"image_size": 224, "patch_size": 14, "width": 1024, "layers": 24, "heads": 16},
        "text": {**_ERNIE_TEXT, "width": 1024, "layers": 24, "heads": 16, "intermediate_size": 4096},
    },
}


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update that returns a new dict."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def create_model(model: str | DualEncoderConfig | dict[str, Any], **overrides: Any) -> DualEncoder:
    """Build a `DualEncoder` from a preset name, a config or a config dict.

    `overrides` are merged into the config dict, e.g. `create_model("ernie_vil2_base", vision={"layers": 2})`.
    Sizes whose weights could not fit in the memory available are a ValueError before any is allocated.
    """
    if isinstance(model, str):
        if model not in PRESETS:
            raise ValueError(f"unknown model preset {model!r}; choose one of {', '.join(sorted(PRESETS))}")
        data = PRESETS[model]
    elif isinstance(model, DualEncoderConfig):
        data = model.to_dict()
    elif isinstance(model, dict):
        data = model
    else:
        kind = type(model).__name__
        raise TypeError(f"create_model expects a preset name, DualEncoderConfig or dict, not {kind}")
    config = DualEncoderConfig.from_dict(_merge(data, overrides))
    check_fits_in_memory(config)
    return DualEncoder(config)
