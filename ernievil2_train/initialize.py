"""The model a training run starts from: from scratch, from a converted checkpoint, or with tower weights.

Hydra: `model: {_target_: ernievil2_train.initialize.build_model, preset: ernie_vil2_base, ...}`.
Hub downloads are not supported: every weight file is local.

Tower weight files may come from this framework (a converted or exported `model.safetensors`, a training
`.ckpt`), from timm (a `VisionTransformer` state dict; a classifier or projection `head` is left out) or from
transformers (`ErnieModel`, or an `ErnieFor*` model whose pretraining heads `cls.*` are left out). ERNIE 3.0's
token-type and task-type tables are folded into the position embeddings: the text tower always uses type id 0,
so adding row 0 of each table to every position keeps the encoder's output exactly. Every tower weight must be
found in the file, with its shape; what was loaded, left out or folded is logged.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from ernievil2_train.checkpoints.errors import short_reason, state_mismatch
from ernievil2_train.config_checks import ConfigError, not_a_folder
from ernievil2_train.models import DualEncoder, create_model

log = logging.getLogger(__name__)

TOWER_PREFIXES = {"vision": ("model.vision.", "vision."), "text": ("model.text.", "text.")}
# Keys of other libraries' checkpoints that the towers have no place for (left out unless the tower has them).
LEFT_OUT = {"vision": re.compile(r"^head\."), "text": re.compile(r"^cls\.|(^|\.)position_ids$")}
ERNIE_PREFIX = "ernie."
ERNIE_PARTS = ("embeddings.", "encoder.", "pooler.")
POSITIONS = "ernie.embeddings.position_embeddings.weight"
TYPE_TABLES = (
    "ernie.embeddings.token_type_embeddings.weight",
    "ernie.embeddings.task_type_embeddings.weight",
)


def _read_state(path: Path, key: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"config key 'model.{key}': weight file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"config key 'model.{key}': cannot read {path} ({short_reason(err)})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"config key 'model.{key}': {path} does not hold a state dict of tensors")
    return state


def _tower_state(state: dict[str, torch.Tensor], tower: str) -> dict[str, torch.Tensor]:
    """Keys relative to the tower: strip a `model.<tower>.` / `<tower>.` prefix when the file has one."""
    for prefix in TOWER_PREFIXES[tower]:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _ernie_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """transformers ERNIE keys in the text tower's names: the `ernie.` prefix of a bare `ErnieModel` added,
    row 0 of the token-type / task-type tables added to every position embedding. Returns the folded keys."""
    if not any(k.startswith(ERNIE_PREFIX) for k in state) and any(k.startswith(ERNIE_PARTS) for k in state):
        state = {(ERNIE_PREFIX + k if k.startswith(ERNIE_PARTS) else k): v for k, v in state.items()}
    folded = []
    for table in TYPE_TABLES:
        positions, types = state.get(POSITIONS), state.get(table)
        if positions is None or types is None or types.ndim != 2 or types.shape[-1] != positions.shape[-1]:
            continue
        state = {k: v for k, v in state.items() if k != table}
        state[POSITIONS] = positions + types[0].to(positions.dtype)
        folded.append(table)
    return state, folded


def load_tower_weights(model: DualEncoder, tower: str, path: str | Path) -> None:
    """Load `path` (.safetensors or torch .pt/.pth/.bin) into `model.<tower>`; every tower weight must be in
    it with its shape (see the module docstring for the timm and transformers layouts)."""
    key = f"{tower}_weights"
    path = Path(path)
    state = _tower_state(_read_state(path, key), tower)
    module = getattr(model, tower)
    expected = module.state_dict()
    folded: list[str] = []
    if tower == "text":
        state, folded = _ernie_keys(state)
    left_out = sorted(k for k in state if k not in expected and LEFT_OUT[tower].search(k))
    state = {k: v for k, v in state.items() if k not in left_out}
    mismatch = state_mismatch(expected, state)
    if mismatch:
        raise ConfigError(f"config key 'model.{key}': {path} does not fit the {tower} tower ({mismatch})")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    log.info(
        "model.%s: loaded all %d %s tower tensors from %s%s%s", key, len(expected), tower, path,
        f"; left out {', '.join(left_out)}" if left_out else "",
        f"; folded {', '.join(folded)} (row 0) into the position embeddings" if folded else "",
    )


def _plain(config: Any) -> dict[str, Any]:
    """Nested plain dicts (Hydra passes DictConfig)."""
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return dict(config)


def build_model(
    preset: str | None = None,
    config: dict[str, Any] | None = None,
    checkpoint: str | None = None,
    vision_weights: str | None = None,
    text_weights: str | None = None,
    logit_scale: float | None = None,
) -> DualEncoder:
    """A `DualEncoder` in train mode.

    Exactly one of: `preset` (optionally with `config` overrides merged in), `config` (a full
    `DualEncoderConfig` dict), `checkpoint` (a `save_pretrained` / convert folder; its temperature is kept).
    Then `vision_weights` / `text_weights` replace one tower's weights from a local file, and `logit_scale`
    (a log scale) replaces the temperature.
    """
    if checkpoint is not None:
        if preset is not None or config is not None:
            raise ConfigError("config key 'model.checkpoint' excludes 'model.preset' and 'model.config'")
        from ernievil2_train.checkpoints.io import load_pretrained

        if Path(checkpoint).is_file():
            raise ConfigError(f"config key 'model.checkpoint': {not_a_folder(checkpoint)}")
        if not Path(checkpoint).is_dir():
            raise ConfigError(f"config key 'model.checkpoint': checkpoint folder not found: {checkpoint}")
        model = load_pretrained(checkpoint)
    elif preset is not None:
        model = create_model(preset, **_plain(config or {}))
    elif config is not None:
        model = create_model(_plain(config))
    else:
        raise ConfigError("config key 'model': set one of model.preset, model.config or model.checkpoint")
    if vision_weights is not None:
        load_tower_weights(model, "vision", vision_weights)
    if text_weights is not None:
        load_tower_weights(model, "text", text_weights)
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(float(logit_scale))
    return model.train()
