"""Read official Paddle `.pdparams` checkpoints without Paddle and map them onto `DualEncoder`.

The file is a pickle of `{name: numpy.ndarray}`. It is read with an unpickler that can only rebuild numpy
arrays: any other global in the stream is refused before anything runs.
"""

from __future__ import annotations

import codecs
import dataclasses
import math
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ernievil2_train.checkpoints.ernie_config import ernie_heads, read_ernie_config, with_ernie_config
from ernievil2_train.checkpoints.errors import (
    ZIP_MAGIC,
    CheckpointError,
    check_finite,
    file_head,
    listing,
    short_reason,
)
from ernievil2_train.models import DualEncoder, DualEncoderConfig, TextConfig, VisionConfig

NAME_TABLE_KEY = "StructuredToParameterName@@"
BIG_PARAM_KEY = "UnpackBigParamInfor@@"
IGNORED_PREFIXES = ("visual.classfy.",)
HEAD_DIM = 64


def _reconstruct(subtype: type, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"array subtype {subtype!r} is not numpy.ndarray")
    return _NUMPY_RECONSTRUCT(subtype, shape, dtype)


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for raw array bytes: str -> bytes, nothing else."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("_codecs.encode is only allowed as encode(str, 'latin1')")
    return codecs.encode(text, encoding)


_NUMPY_RECONSTRUCT: Callable[..., np.ndarray] = np.ndarray.__reduce__(np.zeros(1))[0]
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
}


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler whose only reachable globals rebuild numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return allowed


def _unpickle(path: Path) -> Any:
    if file_head(path) == ZIP_MAGIC:
        raise CheckpointError(f"{path}: a torch/zip file, not a Paddle .pdparams pickle")
    try:
        with path.open("rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()
    except _RefusedGlobal as err:
        raise CheckpointError(
            f"{path}: refused to load global {err} (a .pdparams file may only contain numpy arrays)"
        ) from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read file ({err.strerror or err})") from None
    except EOFError:
        raise CheckpointError(f"{path}: file is truncated or empty (pickle stream ended early)") from None
    except pickle.UnpicklingError as err:
        reason = "truncated" if "truncated" in str(err) else f"not a .pdparams pickle ({short_reason(err)})"
        raise CheckpointError(f"{path}: {reason}") from None
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable .pdparams pickle ({short_reason(err)})") from None


def _join_big_params(state: dict[str, Any], path: Path) -> None:
    """Reassemble parameters that Paddle split into `name@@.0`, `name@@.1`, ... (pickle protocol 2/3)."""
    info = state.pop(BIG_PARAM_KEY, None)
    if info is None:
        return
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: malformed {BIG_PARAM_KEY} entry")
    for name, entry in info.items():
        slices = entry.get("slices", []) if isinstance(entry, dict) else []
        missing = [part for part in slices if part not in state]
        if not slices or missing or "OriginShape" not in entry:
            raise CheckpointError(f"{path}: split parameter {name} is incomplete (missing parts: {missing})")
        flat = np.concatenate([np.asarray(state.pop(part)).reshape(-1) for part in slices])
        shape = tuple(entry["OriginShape"])
        if flat.size != math.prod(shape):
            raise CheckpointError(f"{path}: split parameter {name} has {flat.size} values, shape {shape}")
        state[name] = flat.reshape(shape)


def read_pdparams(path: str | Path) -> dict[str, np.ndarray]:
    """All parameter arrays of a `.pdparams` file, minus the name table and the unused classifier."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a .pdparams file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    state = _unpickle(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a .pdparams state dict (top level is {type(state).__name__})")
    state.pop(NAME_TABLE_KEY, None)
    _join_big_params(state, path)
    arrays = {}
    for name, value in state.items():
        if not isinstance(name, str) or name.startswith(IGNORED_PREFIXES):
            continue
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            raise CheckpointError(f"{path}: entry {name} is not a floating-point array")
        arrays[name] = value
    return arrays


_VIT_LINEAR = r"(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
# (Paddle name pattern, our name template, is a Paddle Linear weight stored [in, out])
_RULES: list[tuple[str, str, bool]] = [
    (r"visual\.class_embedding", "vision.cls_token", False),
    (r"visual\.positional_embedding", "vision.pos_embed", False),
    (r"visual\.patch_embed\.proj\.weight", "vision.patch_embed.proj.weight", False),
    (r"visual\.norm_pre\.(weight|bias)", r"vision.norm_pre.\1", False),
    (r"visual\.norm_post\.(weight|bias)", r"vision.norm.\1", False),
    (r"visual\.blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)", r"vision.blocks.\1.\2.\3", False),
    (rf"visual\.blocks\.(\d+)\.{_VIT_LINEAR}\.weight", r"vision.blocks.\1.\2.weight", True),
    (rf"visual\.blocks\.(\d+)\.{_VIT_LINEAR}\.bias", r"vision.blocks.\1.\2.bias", False),
    (r"text_model\.word_emb\.weight", "text.ernie.embeddings.word_embeddings.weight", False),
    (r"text_model\.pos_emb\.weight", "text.ernie.embeddings.position_embeddings.weight", False),
    (r"text_model\.ln\.(weight|bias)", r"text.ernie.embeddings.LayerNorm.\1", False),
    (r"text_model\.pooler\.weight", "text.ernie.pooler.dense.weight", True),
    (r"text_model\.pooler\.bias", "text.ernie.pooler.dense.bias", False),
    (r"contrastive_loss_mm\.temperature_b", "logit_scale", False),
]
_ERNIE_LAYER = {
    "attn.q": ("attention.self.query", True),
    "attn.k": ("attention.self.key", True),
    "attn.v": ("attention.self.value", True),
    "attn.o": ("attention.output.dense", True),
    "ln1": ("attention.output.LayerNorm", False),
    "ffn.i": ("intermediate.dense", True),
    "ffn.o": ("output.dense", True),
    "ln2": ("output.LayerNorm", False),
}
for _paddle, (_ours, _linear) in _ERNIE_LAYER.items():
    _RULES.append(
        (
            rf"text_model\.encoder_stack\.block\.(\d+)\.{re.escape(_paddle)}\.(weight|bias)",
            rf"text.ernie.encoder.layer.\1.{_ours}.\2",
            _linear,
        )
    )
_COMPILED = [(re.compile(pattern), template, linear) for pattern, template, linear in _RULES]


def map_name(name: str) -> tuple[str, bool] | None:
    """Our parameter name for a Paddle name and whether it needs the Linear transpose; None if unknown."""
    for pattern, template, linear in _COMPILED:
        match = pattern.fullmatch(name)
        if match:
            return match.expand(template), linear and name.endswith(".weight")
    return None


def _shape(arrays: dict[str, np.ndarray], name: str, source: str, ndim: int) -> tuple[int, ...]:
    """The shape of `arrays[name]`, which must exist and have `ndim` dimensions."""
    if name not in arrays:
        raise CheckpointError(f"{source}: missing key {name} (needed to infer the architecture)")
    shape = arrays[name].shape
    if len(shape) != ndim:
        raise CheckpointError(f"{source}: {name} has shape {shape}, expected a {ndim}-D array")
    return shape


def _count_layers(arrays: dict[str, np.ndarray], prefix: str) -> int:
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)\.")
    indices = {int(m.group(1)) for name in arrays if (m := pattern.match(name))}
    return max(indices) + 1 if indices else 0


def default_heads(width: int) -> int:
    """width // 64 heads (at least 1; every official model has heads of 64 channels) when that divides the
    width, else the head count nearest to width / 64 that does (the fewer on a tie)."""
    heads = max(width // HEAD_DIM, 1)
    if width % heads == 0:
        return heads
    divisors = [h for h in range(1, width + 1) if width % h == 0]
    return min(divisors, key=lambda h: (abs(h - width / HEAD_DIM), h))


def mlp_ratio(hidden: int, width: int) -> float:
    """The MLP ratio that the ViT turns back into `hidden` channels (`int(width * ratio)`, as timm does):
    hidden / width, nudged up where the float product falls just short (61 / 56 * 56 = 60.99...)."""
    ratio = hidden / width
    while int(width * ratio) < hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def _heads(width: int, heads: int | None, tower: str, source: str) -> int:
    heads = heads if heads is not None else default_heads(width)
    if heads <= 0:
        raise CheckpointError(f"{source}: {tower} heads must be a positive integer, got {heads}")
    if width % heads:
        raise CheckpointError(f"{source}: {tower} width {width} is not divisible by {heads} heads")
    return heads


def _image_size(arrays: dict[str, np.ndarray], source: str) -> tuple[int, int, int]:
    """(width, patch size, image size) from the patch convolution and the positional embedding."""
    conv_name, pos_name = "visual.patch_embed.proj.weight", "visual.positional_embedding"
    width, _, patch, patch_w = _shape(arrays, conv_name, source, 4)
    if patch != patch_w:
        raise CheckpointError(f"{source}: {conv_name} has non-square {patch}x{patch_w} patches")
    num_patches = _shape(arrays, pos_name, source, 3)[1] - 1
    grid = math.isqrt(max(num_patches, 0))
    if num_patches <= 0 or grid * grid != num_patches:
        raise CheckpointError(
            f"{source}: cannot infer image size: {pos_name} has {num_patches} patch positions "
            "(not a square grid)"
        )
    return width, patch, grid * patch


def infer_config(
    arrays: dict[str, np.ndarray],
    vision_heads: int | None = None,
    text_heads: int | None = None,
    source: str = "",
) -> DualEncoderConfig:
    """Architecture read off the tensor shapes; heads default to `default_heads(width)`."""
    width, patch, image_size = _image_size(arrays, source)
    hidden = _shape(arrays, "visual.blocks.0.mlp.fc1.weight", source, 2)[-1]
    vocab, text_width = _shape(arrays, "text_model.word_emb.weight", source, 2)
    prefix = "text_model.encoder_stack.block."
    intermediate = _shape(arrays, f"{prefix}0.ffn.i.weight", source, 2)[-1]
    positions = _shape(arrays, "text_model.pos_emb.weight", source, 2)[0]
    vision_heads = _heads(width, vision_heads, "vision", source)
    text_heads = _heads(text_width, text_heads, "text", source)
    try:
        return DualEncoderConfig(
            vision=VisionConfig(
                image_size=image_size,
                patch_size=patch,
                width=width,
                layers=_count_layers(arrays, "visual.blocks."),
                heads=vision_heads,
                mlp_ratio=mlp_ratio(hidden, width) if width else 0.0,
            ),
            text=TextConfig(
                vocab_size=vocab,
                width=text_width,
                layers=_count_layers(arrays, prefix),
                heads=text_heads,
                intermediate_size=intermediate,
                max_position_embeddings=positions,
            ),
        )
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from None


def paddle_names(config: DualEncoderConfig) -> list[str]:
    """Every parameter name an official checkpoint of this architecture holds (classifier excluded)."""
    wb = ("weight", "bias")
    names = ["visual.class_embedding", "visual.positional_embedding", "visual.patch_embed.proj.weight"]
    names += [f"visual.{norm}.{p}" for norm in ("norm_pre", "norm_post") for p in wb]
    vit_parts = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    names += [
        f"visual.blocks.{i}.{part}.{p}" for i in range(config.vision.layers) for part in vit_parts for p in wb
    ]
    names += ["text_model.word_emb.weight", "text_model.pos_emb.weight"]
    names += [f"text_model.{m}.{p}" for m in ("ln", "pooler") for p in wb]
    names += [
        f"text_model.encoder_stack.block.{i}.{part}.{p}"
        for i in range(config.text.layers)
        for part in _ERNIE_LAYER
        for p in wb
    ]
    return [*names, "contrastive_loss_mm.temperature_b"]


def to_state_dict(
    arrays: dict[str, np.ndarray], model: DualEncoder, source: str = ""
) -> dict[str, torch.Tensor]:
    """Check names and shapes against `model`, then map and transpose every array into its state dict."""
    expected_names = paddle_names(model.config)
    missing = [name for name in expected_names if name not in arrays]
    unexpected = sorted(set(arrays) - set(expected_names))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: checkpoint does not fit the inferred architecture: "
            f"missing keys {listing(missing)}; unexpected keys {listing(unexpected)}"
        )
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for name in expected_names:
        ours, transpose = map_name(name)
        array = arrays[name]
        tensor = torch.from_numpy(np.ascontiguousarray(array.T if transpose else array, dtype=np.float32))
        target = expected[ours].shape
        if ours == "logit_scale" and tensor.numel() == 1:
            tensor = tensor.reshape(target)
            if not torch.isfinite(tensor):
                raise CheckpointError(f"{source}: {name} is not finite ({tensor.item()})")
        if tensor.shape != target:
            want = tuple(reversed(target)) if transpose else tuple(target)
            raise CheckpointError(
                f"{source}: shape mismatch for {name}: checkpoint {tuple(array.shape)}, expected {want}"
            )
        state[ours] = tensor
    check_finite(state, source)
    return state


def load_pdparams(
    path: str | Path,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    text_config: str | Path | None = None,
) -> DualEncoder:
    """A `DualEncoder` (eval mode) holding the weights of an official `.pdparams` checkpoint; `text_config`,
    the release's ERNIE config, gives the text heads and dropout rates (its sizes must be the weights')."""
    ernie = read_ernie_config(text_config) if text_config is not None else None
    if ernie is not None:
        text_heads = ernie_heads(ernie, text_heads, text_config)
    arrays = read_pdparams(path)
    source = str(path)
    config = infer_config(arrays, vision_heads, None if ernie is not None else text_heads, source)
    if ernie is not None:  # its sizes first: another model's config is told as such, not by its heads
        text = with_ernie_config(config.text, ernie, text_config, source)
        config.text = dataclasses.replace(text, heads=_heads(text.width, text_heads, "text", source))
    model = DualEncoder(config)
    model.load_state_dict(to_state_dict(arrays, model, source))
    return model.eval()
