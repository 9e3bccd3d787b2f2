"""Save and load `DualEncoder` checkpoints as `model.safetensors` + `config.json` (+ `vocab.txt`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ernievil2_train.checkpoints.paddle import CheckpointError
from ernievil2_train.models import DualEncoder, DualEncoderConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
VOCAB_NAME = "vocab.txt"


def save_pretrained(
    model: DualEncoder,
    out_dir: str | Path,
    vocab_file: str | Path | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write weights, config (and a copy of the vocabulary) into `out_dir`; returns the folder.
    `state_dict`: the weights to write instead of `model.state_dict()` (e.g. gathered from FSDP shards)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if vocab_file is not None:
        if not Path(vocab_file).is_file():
            raise CheckpointError(f"{vocab_file}: vocabulary file not found")
        shutil.copyfile(vocab_file, out / VOCAB_NAME)
    weights = model.state_dict() if state_dict is None else state_dict
    state = {name: t.detach().to("cpu").contiguous() for name, t in weights.items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n", encoding="utf-8")
    return out


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> DualEncoder:
    """The `DualEncoder` saved in `path` by `save_pretrained`, on `device`, in eval mode."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: not a checkpoint folder (missing {', '.join(missing)})")
    try:
        config = DualEncoderConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8")))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{folder / CONFIG_NAME}: invalid model config ({err})") from None
    model = DualEncoder(config)
    try:
        state = load_file(str(folder / WEIGHTS_NAME))
    except Exception as err:
        raise CheckpointError(f"{folder / WEIGHTS_NAME}: unreadable safetensors file ({err})") from None
    expected = model.state_dict()
    missing_keys = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing_keys or unexpected or wrong:
        raise CheckpointError(
            f"{folder / WEIGHTS_NAME}: weights do not match config.json "
            f"(missing {missing_keys}, unexpected {unexpected}, wrong shape {wrong})"
        )
    model.load_state_dict(state)
    return model.to(device).eval()


def find_vocab(path: str | Path) -> Path | None:
    """`path/vocab.txt` if the checkpoint folder carries a vocabulary."""
    vocab = Path(path) / VOCAB_NAME
    return vocab if vocab.is_file() else None


MODEL_CONFIG_KEY = "model_config"  # the `DualEncoderConfig` dict that training checkpoints carry


def load_training_checkpoint(path: str | Path) -> DualEncoder:
    """The `DualEncoder` of a Lightning training checkpoint file (`last.ckpt`, `best-epoch*.ckpt`,
    `hpc_ckpt_*.ckpt`), in eval mode on CPU. Read with `weights_only=True`: no code in the file runs."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path}: a sharded (FSDP) checkpoint folder; consolidate it into one file first with "
            "`python -m lightning.pytorch.utilities.consolidate_checkpoint`"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable training checkpoint ({type(err).__name__})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a Lightning training checkpoint (no state_dict)")
    if MODEL_CONFIG_KEY not in checkpoint:
        raise CheckpointError(f"{path}: no model config in the checkpoint (not written by ErnieVil2Module)")
    try:
        model = DualEncoder(DualEncoderConfig.from_dict(checkpoint[MODEL_CONFIG_KEY]))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: invalid model config ({err})") from None
    weights = checkpoint["state_dict"].items()
    state = {k.removeprefix("model."): v for k, v in weights if k.startswith("model.")}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or wrong:
        raise CheckpointError(
            f"{path}: weights do not match its model config (missing {missing[:8]}, wrong shape {wrong[:8]})"
        )
    model.load_state_dict({k: state[k] for k in expected})
    return model.eval()
