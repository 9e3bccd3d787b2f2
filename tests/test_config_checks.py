"""Config sections made into dataclasses: defaults, instances, mappings checked field by field."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from ernievil2_train.config_checks import dataclass_from


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
