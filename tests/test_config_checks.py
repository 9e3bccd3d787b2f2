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
    "image_size": 224,
    "data": {"root": "/d", "my_root": "/e", "vocab": "${.my_root}/vocab.txt", "image_size": 64,
             "batch_size": 8,
             "datamodule": {"_target_": "x.DataModule", "batch_size": 4, "new_arg": 1,
                            "image_size": "${..image_size}"}},
    "callbacks": {"stop": {"monitor": "val/loss"},
                  "early": {"_target_": "x.EarlyStopping", "monitor": "val/loss"}},
    "tag": "a",
    "lonely": {"_target_": "x.Nothing"},
})
HYDRA = OmegaConf.create({"run": {"dir": "/runs/${tag}"}})


@pytest.mark.parametrize("override", [
    "+data.datamodule.new_arg=1",  # the constructor above it takes it (or says it does not)
    "+callbacks.early={_target_:x.EarlyStopping,monitor:val/loss}",  # a node that builds itself
    "+data.my_root=/e",  # an interpolation reads it (relative to its node)
    "+tag=a",  # Hydra's config reads it
    "+experiment=demo",  # a group choice: no key
    "++extra=2",  # set or replace: kept as it is
    "seed=1",
])
def test_keys_added_for_something_to_read_pass(override: str) -> None:
    check_added_keys(ADDED, [override], HYDRA)


@pytest.mark.parametrize(("override", "message"), [
    ("+data.batch_size=8", "config key 'data.batch_size' (added by +data.batch_size=8) is read by nothing, "
                           "so it would change nothing; did you mean 'data.datamodule.batch_size'? "
                           "(++data.batch_size=8 keeps it as a note in the run's config)"),
    ("+extra=2", "config key 'extra' (added by +extra=2) is read by nothing, so it would change nothing"),
    ("+image_size=224", "config key 'image_size' (added by +image_size=224) is read by nothing"),  # only
    # `data.image_size` is
    ("+callbacks.stop.monitor=val/loss", "config key 'callbacks.stop.monitor' (added by "
     "+callbacks.stop.monitor=val/loss) is read by nothing"),
    ("+lonely={_target_:x.Nothing}", "config key 'lonely' (added by +lonely={_target_:x.Nothing}) is read"),
])
def test_a_key_added_for_nothing_is_refused_naming_it(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_added_keys(ADDED, ["seed=1", override], HYDRA)
