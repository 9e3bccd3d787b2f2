"""Config checks: sections made into dataclasses field by field, `_target_` names located."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch

from ernievil2_train.config_checks import ConfigError, dataclass_from, locate_target


@dataclass
class Section:
    size: int = 1
    name: str = "a"


def test_none_gives_the_defaults_and_an_instance_is_taken_as_it_is() -> None:
    assert dataclass_from(Section, None, "section") == Section()
    given = Section(2)
    assert dataclass_from(Section, given, "section") is given


def test_a_mapping_is_checked_field_by_field() -> None:
    assert dataclass_from(Section, {"size": 3}, "section") == Section(3, "a")
    with pytest.raises(ValueError, match=r"unknown section config field\(s\): colour, sise"):
        dataclass_from(Section, {"sise": 3, "colour": "red"}, "section")
    with pytest.raises(ValueError, match="section config must be a mapping of fields, got list"):
        dataclass_from(Section, [("size", 3)], "section")


def test_a_target_is_located_or_refused_naming_its_key():
    """A misspelt `_target_` is one line naming the key and the name that is missing, never Hydra's logged
    errors and an import hint without the key."""
    assert locate_target("module.optimizer._target_", "torch.optim.AdamW") is torch.optim.AdamW
    cases = {
        "foo.Bar": "foo.Bar not found (no module 'foo')",
        "torch.optim.Foo": "torch.optim.Foo not found (torch.optim has no 'Foo')",
        "ernievil2_train.nope.X": "ernievil2_train.nope.X not found (ernievil2_train has no 'nope')",
    }
    for target, message in cases.items():
        with pytest.raises(ConfigError, match=re.escape(f"config key 'k._target_': {message}")):
            locate_target("k._target_", target)
