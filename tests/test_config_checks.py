"""Config checks: sections made into dataclasses field by field, `_target_` names located, keys added for
nothing refused."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
from omegaconf import OmegaConf

from ernievil2_train.config_checks import ConfigError, check_added_keys, dataclass_from, locate_target


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


ADDED = OmegaConf.create({
    "seed": 1,
    "extra": 2,
    "data": {"root": "/d", "my_root": "/e", "vocab": "${.my_root}/vocab.txt", "batch_size": 8,
             "datamodule": {"_target_": "x.DataModule", "batch_size": 4, "new_arg": 1}},
    "callbacks": {"stop": {"monitor": "val/loss"}},
})


@pytest.mark.parametrize("override", [
    "+data.datamodule.new_arg=1",  # the constructor above it takes it (or says it does not)
    "+data.my_root=/e",  # an interpolation reads it
    "+experiment=demo",  # a group choice: no key
    "++extra=2",  # set or replace
    "seed=1",
])
def test_keys_added_for_something_to_read_pass(override: str) -> None:
    check_added_keys(ADDED, [override])


@pytest.mark.parametrize(("override", "message"), [
    ("+data.batch_size=8", "config key 'data.batch_size' (added by +data.batch_size=8) is read by nothing, "
                           "so it would change nothing; did you mean 'data.datamodule.batch_size'?"),
    ("+extra=2", "config key 'extra' (added by +extra=2) is read by nothing, so it would change nothing"),
    ("+callbacks.stop.monitor=val/loss", "config key 'callbacks.stop.monitor' (added by "
     "+callbacks.stop.monitor=val/loss) is read by nothing"),
])
def test_a_key_added_for_nothing_is_refused_naming_it(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_added_keys(ADDED, ["seed=1", override])
