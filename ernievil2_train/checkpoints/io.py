"""Save and load `DualEncoder` checkpoints as `model.safetensors` + `config.json` (+ `vocab.txt`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ernievil2_train.checkpoints.errors import (
    ZIP_MAGIC,
    CheckpointError,
    check_finite,
    check_float,
    file_head,
    short_reason,
    state_mismatch,
)
from ernievil2_train.models import DualEncoder, DualEncoderConfig
from ernievil2_train.models.memory import check_fits_in_memory, weight_bytes
from ernievil2_train.optim import count_layers
from ernievil2_train.text.vocab import check_vocab_fits

_T = TypeVar("_T")
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
VOCAB_NAME = "vocab.txt"
SHARDED_META_NAME = "meta.pt"  # written by Lightning's FSDP strategy into a sharded checkpoint folder


def check_vocab(vocab_file: str | Path, vocab_size: int) -> None:
    """Raise `CheckpointError` unless `vocab_file` reads as a vocabulary whose ids fit `vocab_size`."""
    path = Path(vocab_file)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a vocabulary file")
    if not path.is_file():
        raise CheckpointError(f"{path}: vocabulary file not found")
    try:
        check_vocab_fits(path, vocab_size)
    except (OSError, ValueError) as err:
        message = " ".join(str(err).split())
        raise CheckpointError(message if str(path) in message else f"{path}: {message}") from None


def check_output(src: str | Path, out_dir: str | Path) -> None:
    """Raise `CheckpointError` when the output folder would be the input file itself, or is a file."""
    if Path(out_dir).resolve() == Path(src).resolve():
        raise CheckpointError(f"{out_dir}: the output folder is the input file; choose a new folder")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise CheckpointError(f"{out_dir}: is a file, not a folder; choose a folder for the checkpoint")


def _vocab_fits(vocab_file: Path, vocab_size: int) -> bool:
    try:
        check_vocab(vocab_file, vocab_size)
    except CheckpointError:
        return False
    return True


def save_pretrained(
    model: DualEncoder,
    out_dir: str | Path,
    vocab_file: str | Path | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write weights, config (and a copy of the vocabulary, checked first) into `out_dir`; returns the folder.
    `state_dict`: the weights to write instead of `model.state_dict()` (e.g. gathered from FSDP shards).
    Every file is written under a temporary name first and renamed into place once all are: a failure
    leaves the files an earlier save wrote as they were. Saved without `vocab_file`, the vocabulary of an
    earlier save stays if its ids fit the model's text vocab size, and is removed otherwise."""
    if not str(out_dir):
        raise CheckpointError("the checkpoint folder path is empty")
    out = Path(out_dir)
    for name in (WEIGHTS_NAME, VOCAB_NAME, CONFIG_NAME):
        check_not_a_folder(out / name)  # else the files renamed before it would be replaced, and it not
    if vocab_file is not None:
        check_vocab(vocab_file, model.config.text.vocab_size)
    stale_vocab = vocab_file is None and not _vocab_fits(out / VOCAB_NAME, model.config.text.vocab_size)
    weights = model.state_dict() if state_dict is None else state_dict
    state = {name: t.detach().to("cpu").contiguous() for name, t in weights.items()}
    staged = {name: out / f".{name}.tmp" for name in (WEIGHTS_NAME, VOCAB_NAME, CONFIG_NAME)}
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(staged[WEIGHTS_NAME]), metadata={"format": "pt"})
        _readable_as_umask_allows(staged[WEIGHTS_NAME])
        if vocab_file is not None:
            shutil.copyfile(vocab_file, staged[VOCAB_NAME])
        config = json.dumps(model.config.to_dict(), indent=2) + "\n"
        staged[CONFIG_NAME].write_text(config, encoding="utf-8")
        for name, tmp in staged.items():
            if tmp.exists():
                os.replace(tmp, out / name)
        if stale_vocab:
            (out / VOCAB_NAME).unlink(missing_ok=True)
    except (OSError, SafetensorError) as err:
        reason = getattr(err, "strerror", None) or short_reason(err)
        raise CheckpointError(f"{out}: cannot write the checkpoint folder ({reason})") from None
    finally:
        for tmp in staged.values():
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    return out


def _readable_as_umask_allows(path: Path) -> None:
    """Give `path` the mode a plainly written file gets (safetensors writes its file owner-only)."""
    path.chmod(0o666 & ~_current_umask())


def _current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (`/proc/self/status`); elsewhere
    set and restored at once, which other threads could briefly see."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> DualEncoder:
    """The `DualEncoder` saved in `path` by `save_pretrained`, on `device`, in eval mode."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: not a checkpoint folder (missing {', '.join(missing)})")
    config_file = folder / CONFIG_NAME
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except OSError as err:
        raise CheckpointError(f"{config_file}: cannot read file ({err.strerror or err})") from None
    except ValueError as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({short_reason(err)})") from None
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise CheckpointError(f"{config_file}: invalid model config (must be a JSON object, not a {kind})")
    weights = folder / WEIGHTS_NAME
    try:
        with safe_open(str(weights), "pt") as header:  # names and shapes only: no tensor is read
            saved = {name: _shaped(header.get_slice(name).get_shape()) for name in header.keys()}  # noqa: SIM118
        model = _build_model(data, config_file, saved, f"{weights}: weights do not match config.json")
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({short_reason(err)})") from None
    check_float(state, weights)
    check_finite(state, weights)
    model.load_state_dict(state)
    return model.to(device).eval()


def find_vocab(path: str | Path) -> Path | None:
    """`path/vocab.txt` if the checkpoint folder carries a vocabulary (CheckpointError if it is a folder)."""
    vocab = Path(path) / VOCAB_NAME
    check_not_a_folder(vocab)
    return vocab if vocab.is_file() else None


def check_not_a_folder(path: Path) -> None:
    """CheckpointError when `path`, a file of a checkpoint folder, is a folder."""
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; a checkpoint folder holds a file of that name")


def training_vocab(path: str | Path) -> Path | None:
    """The vocabulary a training checkpoint's data was tokenised with (recorded in its data module's state),
    while that file is still there; None otherwise."""
    from ernievil2_train.data.datamodule import DATA_VOCAB_KEY  # the data pipeline only when asked

    for value in read_training_checkpoint(path).values():
        if isinstance(value, dict) and isinstance(value.get(DATA_VOCAB_KEY), str):
            vocab = Path(value[DATA_VOCAB_KEY])
            return vocab if vocab.is_file() else None
    return None


def foreign_vocab(out_dir: Path, vocab_size: int) -> str | None:
    """Why the vocab.txt already in `out_dir` belongs to another model than one with `vocab_size` text
    embeddings, or None: the folder's config.json says the model saved beside it had another table size.
    (A vocabulary whose ids do not fit the table at all is removed by `save_pretrained` anyway.)"""
    if find_vocab(out_dir) is None:
        return None
    try:
        earlier = json.loads((out_dir / CONFIG_NAME).read_text(encoding="utf-8"))["text"]["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no earlier checkpoint here: the vocabulary was put beside it on purpose
    if earlier == vocab_size:
        return None
    return f"it came with a model of {earlier} text embeddings, this one has {vocab_size}"


def save_with_vocab(
    model: DualEncoder, out_dir: str | Path, vocab_file: str | Path | None
) -> tuple[Path, str]:
    """`save_pretrained`, and what became of the folder's vocabulary, in words: copied from `vocab_file`,
    kept from an earlier save of this model's size, removed as another model's, or none."""
    foreign = None if vocab_file else foreign_vocab(Path(out_dir), model.config.text.vocab_size)
    out = save_pretrained(model, out_dir, vocab_file=vocab_file)
    if foreign:
        (out / VOCAB_NAME).unlink()
        return out, (f"removed the vocab.txt it held: {foreign}, another model's; copy this one's in with "
                     "--vocab")
    if vocab_file:
        return out, f"with {vocab_file}"
    return out, "kept its vocab.txt" if find_vocab(out) else "no vocab.txt (--vocab copies one in)"


def _build_model(
    config: Any, source: Path, saved: dict[str, Any], mismatch_message: str, extra_ok: bool = False
) -> DualEncoder:
    """The `DualEncoder` of a config dict, once its weight names and shapes are found to be those `saved`
    holds; checked before any memory is taken (a config of other sizes than its weights, mistyped say, could
    ask for more than the machine has). An invalid config is a `CheckpointError` naming `source`, weights
    that do not fit are one starting with `mismatch_message`. Its tensors are allocated, not initialised
    (a random init of Base takes seconds): the caller loads every one of them, strictly."""
    model_config = _checked(lambda: DualEncoderConfig.from_dict(config), source)
    for tower in ("vision", "text"):
        held = count_layers([name for name in saved if name.startswith(f"{tower}.")])
        wanted = getattr(model_config, tower).layers
        if held != wanted:
            raise CheckpointError(f"{mismatch_message} ({tower}.layers is {wanted}, the weights hold {held})")
    with torch.device("meta"):
        shell = _checked(lambda: DualEncoder(model_config), source)
    mismatch = state_mismatch(shell.state_dict(), saved, extra_ok=extra_ok)
    if mismatch:
        raise CheckpointError(f"{mismatch_message} ({mismatch})")
    try:
        check_fits_in_memory(model_config, weight_bytes(shell))  # the shell is built: count it
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from None
    return shell.to_empty(device="cpu")


def _checked(build: Callable[[], _T], source: Path) -> _T:
    """`build()`, whose `ValueError` or `TypeError` (a config field out of range) is a `CheckpointError`."""
    try:
        return build()
    except (ValueError, TypeError) as err:
        message = " ".join(str(err).split())
        raise CheckpointError(f"{source}: invalid model config ({message})") from None


def _shaped(shape: list[int]) -> torch.Tensor:
    """A tensor of `shape` that holds no memory, standing for a saved one in `state_mismatch`."""
    return torch.empty(shape, device="meta")


MODEL_CONFIG_KEY = "model_config"  # the `DualEncoderConfig` dict that training checkpoints carry


def _folder_message(path: Path) -> str:
    """Why a folder is not a training checkpoint file, and what to pass instead."""
    if (path / SHARDED_META_NAME).is_file() and any(path.glob("*.distcp")):
        return (
            f"{path}: a sharded (FSDP) checkpoint folder; consolidate it into one file first with "
            f"`python -m lightning.pytorch.utilities.consolidate_checkpoint {path}`"
        )
    last = next((p for p in (path / "checkpoints" / "last.ckpt", path / "last.ckpt") if p.is_file()), None)
    example = last or path / "checkpoints" / "last.ckpt"
    return f"{path}: is a folder; pass a .ckpt file (e.g. {example})"


def _torch_load(path: Path) -> Any:
    """`torch.load(path, weights_only=True)` on CPU, memory-mapped (tensor data is read only when used),
    without warnings; failures are one-line errors."""
    head = file_head(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:
        reason = _load_failure(path, head, err)
        raise CheckpointError(f"{path}: not a readable training checkpoint ({reason})") from None


def _load_failure(path: Path, head: bytes, err: Exception) -> str:
    """Why `torch.load` failed, from the file's first bytes, its zip members and the exception."""
    if not head:
        return "the file is empty"
    if head == ZIP_MAGIC:
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return short_reason(err)
        if not any(name.endswith("/data.pkl") for name in names):
            return "a zip archive without the data.pkl of torch.save, a .npz?"
        return short_reason(err)
    if head.startswith(b"\x80"):
        return "a plain pickle (a .pdparams file?), not a torch zip archive"
    return "not a zip file"


def read_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """The dict of a Lightning training checkpoint file, memory-mapped; CheckpointError unless it is one
    (a readable `torch.save` file holding a `state_dict`)."""
    checkpoint = _torch_load(Path(path))
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        converted = Path(path).suffix == ".safetensors"
        hint = "; a converted model's weights: its folder is used as it is" if converted else ""
        raise CheckpointError(f"{path}: not a Lightning training checkpoint (no state_dict){hint}")
    return checkpoint


def load_training_checkpoint(path: str | Path) -> DualEncoder:
    """The `DualEncoder` of a Lightning training checkpoint file (`last.ckpt`, `best-epoch*.ckpt`,
    `hpc_ckpt_*.ckpt`), in eval mode on CPU. Read with `weights_only=True`: no code in the file runs."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(_folder_message(path))
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    checkpoint = read_training_checkpoint(path)
    if MODEL_CONFIG_KEY not in checkpoint:
        raise CheckpointError(f"{path}: no model config in the checkpoint (not written by ErnieVil2Module)")
    weights = checkpoint["state_dict"].items()
    state = {k.removeprefix("model."): v for k, v in weights if k.startswith("model.")}
    check_float(state, path)
    message = f"{path}: weights do not match its model config"
    model = _build_model(checkpoint[MODEL_CONFIG_KEY], path, state, message, extra_ok=True)
    weights = {k: state[k] for k in model.state_dict()}
    check_finite(weights, path)
    model.load_state_dict(weights)
    return model.eval()
