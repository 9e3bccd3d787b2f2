"""Start-up checks of a composed config: required values and input paths, reported by config key."""

from __future__ import annotations

import difflib
import glob
import importlib
import inspect
import math
import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from braceexpand import braceexpand
from omegaconf import DictConfig, ListConfig, OmegaConf

from ernievil2_train.data.decode import is_remote

# Config leaves holding an input path that must exist before training starts.
PATH_KEYS = (
    "vocab_file",
    "eval_set",
    "checkpoint",
    "train_shards",
    "val_shards",
    "vision_weights",
    "text_weights",
)

# Config leaves naming a folder the run writes into (checkpoints, export, loggers).
OUTPUT_KEYS = ("dirpath", "save_dir")
REQUIRED_SECTIONS = ("data", "model", "module", "trainer")  # a run builds each of them


class ConfigError(ValueError):
    """A user mistake in the configuration; reported as one line, exit code 2."""


T = TypeVar("T")


def check_fields(cls: type, data: Any, section: str) -> dict[str, Any]:
    """`data` as a dict, after checking that it is a mapping whose every key is a field of the dataclass
    `cls`."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{section} config must be a mapping of fields, got {type(data).__name__}")
    data = {str(key): value for key, value in data.items()}
    unknown = sorted(set(data) - set(cls.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown {section} config field(s): {', '.join(unknown)}")
    return data


def dataclass_from(cls: type[T], value: T | Mapping[str, Any] | None, section: str) -> T:
    """`value` as a `cls`: None gives the defaults, an instance is taken as it is, a mapping is checked field
    by field (`check_fields`)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    return cls(**check_fields(cls, value, section))


def check_positive_int(value: Any, key: str) -> None:
    """ValueError naming `key` unless `value` is an int > 0 (a bool or a string is not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")


def check_number(value: Any, key: str, low: float = -math.inf, high: float = math.inf) -> float:
    """`value` as a float; ValueError naming `key` unless it is a finite number with low <= value < high."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    if not low <= value < high:
        raise ValueError(f"{key} must be in [{low:g}, {high:g}), got {value!r}")
    return float(value)


def missing_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys of every literal `???` value (interpolations to them are not repeated), in config order."""
    found = []
    for key in cfg:
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_interpolation():
            found += missing_keys(node, f"{prefix}{key}.")
        elif not node._is_interpolation() and node._is_missing():
            found.append(f"{prefix}{key}")
    return found


def _leaf_keys(node: DictConfig, prefix: str = "") -> Iterator[str]:
    for key in node:
        if OmegaConf.is_missing(node, key):
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            yield from _leaf_keys(child, f"{prefix}{key}.")
        elif not isinstance(child, ListConfig):
            yield f"{prefix}{key}"


def _made_from(cfg: DictConfig, key: str) -> str:
    """` (made from ${model.checkpoint}/vocab.txt)` when the value of `key` is an interpolation: the key to
    fix is then the one it names."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or not OmegaConf.is_interpolation(parent, leaf):
        return ""
    return f" (made from {OmegaConf.to_container(parent, resolve=False)[leaf]})"


def not_a_folder(path: str | Path) -> str:
    """Why a file stands where a folder is wanted: a Paddle checkpoint is to be converted first."""
    if Path(path).suffix == ".pdparams":
        return (f"{path} is a Paddle checkpoint file: convert it into a checkpoint folder first "
                f"(python -m ernievil2_train.convert {path} DIR)")
    return f"{path} is a file, not a folder"


def _file_on_the_way(value: str) -> Path | None:
    """The file that a path goes through as if it were a folder (`model.pdparams/vocab.txt`), if any."""
    return next((parent for parent in Path(value).parents if parent.is_file()), None)


def _path_exists(value: str) -> bool:
    for pattern in braceexpand(value):
        if Path(pattern).exists() or (glob.has_magic(pattern) and glob.glob(pattern)):
            return True
    return False


def check_config(cfg: DictConfig) -> None:
    """Raise `ConfigError` naming every missing `???` value, a seed that is not an integer numpy takes, an
    empty cache folder, a negative gradient clipping norm (Lightning would not clip), a validation interval
    below one epoch, fewer than one batch to accumulate, no epoch or step to train, an output folder that is
    a file, or the first local input path that does not exist."""
    missing = missing_keys(cfg)
    if len(missing) == 1:
        key = missing[0]
        raise ConfigError(
            f"missing required config value '{key}': set it on the command line, e.g. {key}=/path/to/it"
        )
    if missing:
        keys = ", ".join(f"'{key}'" for key in missing)
        raise ConfigError(f"missing required config values {keys}: set them on the command line, e.g. "
                          f"{missing[0]}=/path/to/it")
    for section in REQUIRED_SECTIONS:
        if section in cfg and cfg[section] is None:
            raise ConfigError(f"config key '{section}': null, but a run needs it (leave it out to keep the "
                              "default)")
    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"config key 'seed': expected an integer, got {seed!r}")
    if not 0 <= seed < 2**32:
        raise ConfigError(f"config key 'seed': must be from 0 to {2**32 - 1} (numpy's seeds), got {seed}")
    cache_dir = OmegaConf.select(cfg, "paths.cache_dir", default=None)
    if cache_dir == "":
        raise ConfigError("config key 'paths.cache_dir': empty (an empty ERNIEVIL2_CACHE?); set a folder")
    clip = OmegaConf.select(cfg, "trainer.gradient_clip_val", default=None)
    number = isinstance(clip, int | float) and not isinstance(clip, bool)
    if clip is not None and (not number or not 0 <= clip < math.inf):
        raise ConfigError(
            f"config key 'trainer.gradient_clip_val': must be 0 or more and finite (0 or null: no clipping), "
            f"got {clip!r}"
        )
    for key in ("trainer.check_val_every_n_epoch", "trainer.accumulate_grad_batches"):
        count = OmegaConf.select(cfg, key, default=None)
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise ConfigError(f"config key '{key}': must be 1 or more, got {count!r}")
    for key in ("trainer.max_epochs", "trainer.max_steps"):
        limit = OmegaConf.select(cfg, key, default=None)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit == 0:
            raise ConfigError(f"config key '{key}': 0 trains nothing (a checkpoint's zero-shot recall "
                              "without training: python -m ernievil2_train.evaluate)")
    interval = OmegaConf.select(cfg, "trainer.val_check_interval", default=None)
    if interval is not None and not _batches_or_share(interval):
        raise ConfigError(
            "config key 'trainer.val_check_interval': an integer of batches (1 or more) or a share of the "
            f"epoch (a float in (0, 1]), got {interval!r}")
    for key in _leaf_keys(cfg):
        leaf = key.rsplit(".", 1)[-1]
        if leaf in OUTPUT_KEYS:
            folder = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
            if isinstance(folder, str) and folder and Path(folder).exists() and not Path(folder).is_dir():
                raise ConfigError(f"config key '{key}': {folder} is a file, not a folder")
        if leaf not in PATH_KEYS:
            continue
        resolved = OmegaConf.select(cfg, key)
        remote = isinstance(resolved, str) and is_remote(resolved)
        if isinstance(resolved, str) and resolved and not remote and not _path_exists(resolved):
            blocking = _file_on_the_way(resolved)
            why = f"; {not_a_folder(blocking)}" if blocking else ""
            raise ConfigError(f"config key '{key}': path not found: {resolved}{_made_from(cfg, key)}{why}")


def check_added_keys(cfg: DictConfig, overrides: Sequence[str], hydra_cfg: DictConfig | None = None) -> None:
    """Refuse a key added on the command line (`+data.batch_size=8`) that nothing would read: no `_target_`
    at or above it builds it and no interpolation (of the run's config, or of Hydra's: `hydra.run.dir`)
    names it, so the run would go on as if it were not there. Group choices (`+experiment=...`) add no key
    and pass; `++key=value` is taken as it is (a note in the run's config)."""
    referenced = _referenced_keys(OmegaConf.to_container(cfg, resolve=False), [])
    if hydra_cfg is not None:
        referenced |= _referenced_keys(OmegaConf.to_container(hydra_cfg, resolve=False), ["hydra"])
    for override in overrides:
        if not override.startswith("+") or override.startswith("++") or "=" not in override:
            continue
        key, value = override[1:].split("=", 1)
        parts = key.split(".")
        if OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=False) is _ABSENT:
            continue  # a config group, not a key
        if _built(cfg, parts) or any(ref == key or ref.startswith(f"{key}.") or key.startswith(f"{ref}.")
                                     for ref in referenced):
            continue
        raise ConfigError(f"config key '{key}' (added by {override}) is read by nothing, so it would change "
                          f"nothing{_did_you_mean(cfg, key)} (++{key}={value} keeps it as a note in the "
                          "run's config)")


_ABSENT = object()
# a node interpolation `${data.root}`, `${.root}`, `${..root}` (a resolver's `${oc.env:HOME}` is none)
_INTERPOLATION = re.compile(r"\$\{(\.*)([A-Za-z_][\w.]*)\}")


def _referenced_keys(value: Any, path: list[str]) -> set[str]:
    """The absolute keys that the interpolations in an unresolved config container at `path` name."""
    if isinstance(value, dict):
        return set().union(*(_referenced_keys(v, [*path, str(k)]) for k, v in value.items()))
    if isinstance(value, list):
        return set().union(*(_referenced_keys(v, [*path, str(i)]) for i, v in enumerate(value)))
    if not isinstance(value, str):
        return set()
    keys = set()
    for dots, name in _INTERPOLATION.findall(value):
        node = path[:-1][: max(len(path) - len(dots), 0)] if dots else []  # `.`: the value's own node
        keys.add(".".join([*node, name]))
    return keys


def _built(cfg: DictConfig, parts: list[str]) -> bool:
    """Whether a `_target_` at or above the key builds it (a section's own, `callbacks.x`, ...; a node of
    its own at the top is built by nothing)."""
    if len(parts) == 1:
        return False
    nodes = (OmegaConf.select(cfg, ".".join(parts[:depth]), throw_on_resolution_failure=False)
             for depth in range(1, len(parts) + 1))
    return any(isinstance(node, DictConfig) and "_target_" in node for node in nodes)


def _did_you_mean(cfg: DictConfig, key: str) -> str:
    leaf = key.rsplit(".", 1)[-1]
    keys = [k for k in _leaf_keys(cfg) if k != key]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    close = same_leaf or difflib.get_close_matches(key, keys, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _batches_or_share(interval: Any) -> bool:
    """Whether `interval` is a validation interval Lightning can count: batches or a share of the epoch."""
    if isinstance(interval, bool):
        return False
    if isinstance(interval, int):
        return interval >= 1
    return isinstance(interval, float) and 0 < interval <= 1


def _is_tensor(annotation: Any) -> bool:
    """`torch.Tensor`, told without importing torch."""
    return (getattr(annotation, "__module__", ""), getattr(annotation, "__name__", "")) == ("torch", "Tensor")


def _plain_types(annotation: Any) -> tuple[type, ...] | None:
    """The types of a parameter annotated with only int / float / bool / str / None (a tensor alternative, as
    in `lr: float | Tensor`, cannot come from a config and is left out); None otherwise."""
    union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    members = tuple(m for m in (typing.get_args(annotation) if union else (annotation,)) if not _is_tensor(m))
    plain = members and all(m in (int, float, bool, str, type(None)) for m in members)
    return members if plain else None


def _fits(value: Any, accepted: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in accepted
    return isinstance(value, accepted) or (isinstance(value, int) and float in accepted)


def locate_target(key: str, target: str) -> Any:
    """The object a `_target_` names (`package.module.Name`); `ConfigError` naming `key` if there is none."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and not module_name.startswith(error.name):  # one it imports
                raise ConfigError(f"config key '{key}': {target} cannot be imported ({error})") from None
            continue
        except ImportError as error:
            raise ConfigError(f"config key '{key}': {target} cannot be imported ({error})") from None
        for attribute in parts[cut:]:
            if not hasattr(obj, attribute):
                raise ConfigError(f"config key '{key}': {target} not found ({'.'.join(parts[:cut])} has no "
                                  f"{attribute!r})")
            obj = getattr(obj, attribute)
        return obj
    raise ConfigError(f"config key '{key}': {target} not found (no module {parts[0]!r})")


def check_argument_types(key: str, node: DictConfig) -> None:
    """Raise `ConfigError` naming `key.field` when a config value cannot be what the `_target_` class or
    function declares for it (e.g. `batch_size=abc`); only plain int / float / bool / str parameters. Nested
    nodes with a `_target_` of their own (`module.optimizer`) are checked too."""
    for name, child in node.items_ex(resolve=False) if isinstance(node, DictConfig) else []:
        if isinstance(child, DictConfig) and "_target_" in child:
            check_argument_types(f"{key}.{name}", child)
    target = node.get("_target_")
    if not isinstance(target, str):
        return
    obj = locate_target(f"{key}._target_", target)
    try:
        hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    except Exception:  # unresolvable hints: nothing to check by them
        return
    for name, annotation in hints.items():
        accepted = _plain_types(annotation)
        if accepted is None or name not in node or OmegaConf.is_missing(node, name):
            continue
        value = node[name]
        if not _fits(value, accepted):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in accepted)
            raise ConfigError(f"config key '{key}.{name}': expected {wanted}, got {value!r}")
