"""The official release's ERNIE text config (`packages/ernie_base_3.0/ernie_config.base.json`): what a
`.pdparams` file does not hold (the attention heads, the dropout rates), and sizes to check the weights
against."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ernievil2_train.checkpoints.errors import CheckpointError
from ernievil2_train.models import TextConfig

SIZES = {  # ERNIE config key -> the TextConfig field read off the weights
    "hidden_size": "width",
    "num_hidden_layers": "layers",
    "vocab_size": "vocab_size",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
}
DROPOUTS = {"hidden_dropout_prob": "dropout", "attention_probs_dropout_prob": "attention_dropout"}
ACTIVATION = "gelu"  # the tower's exact erf GELU, Paddle's `gelu`


def read_ernie_config(path: str | Path) -> dict[str, Any]:
    """The JSON object in `path` (`CheckpointError` naming the file when it is not one)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the ERNIE config ({err.strerror or err})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a JSON ERNIE config ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON ERNIE config (a {type(data).__name__}, not an object)")
    return data


def ernie_heads(ernie: dict[str, Any], heads: int | None, source: str | Path) -> int:
    """The text heads: `num_attention_heads` of the config, which a given `heads` must agree with."""
    if "num_attention_heads" not in ernie:
        raise CheckpointError(f"{source}: no num_attention_heads (not an ERNIE config such as the release's "
                              "ernie_config.base.json?)")
    value = ernie["num_attention_heads"]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{source}: num_attention_heads must be a positive integer, got {value!r}")
    if heads is not None and heads != value:
        raise CheckpointError(f"{source}: num_attention_heads is {value}, but --text-heads says {heads}")
    return value


def with_ernie_config(
    text: TextConfig, ernie: dict[str, Any], source: str | Path, weights: str
) -> TextConfig:
    """`text` (read off the `weights`) with the config's dropout rates, once its sizes and activation are
    checked against it: a config of another model is refused, naming its key."""
    for key, name in SIZES.items():
        if key in ernie and ernie[key] != getattr(text, name):
            raise CheckpointError(
                f"{source}: {key} is {ernie[key]!r}, but the text tower of {weights} has "
                f"{getattr(text, name)} (another model's config?)"
            )
    if ernie.get("hidden_act", ACTIVATION) != ACTIVATION:
        raise CheckpointError(
            f"{source}: hidden_act {ernie['hidden_act']!r} is not supported (the ERNIE tower uses "
            f"{ACTIVATION})"
        )
    rates = {}
    for key, name in DROPOUTS.items():
        value = ernie.get(key, getattr(text, name))
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise CheckpointError(f"{source}: {key} must be a number in [0, 1), got {value!r}")
        rates[name] = float(value)
    return dataclasses.replace(text, **rates)
