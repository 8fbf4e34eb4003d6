"""core.run_config: overrides merged over the registered config, checked by the model."""

from __future__ import annotations

import pytest

from core.models import PipelineSpec
from core.run_config import ConfigRefused, effective_config

SPEC = PipelineSpec.model_validate({"name": "p", "version": "1", "steps": [
    {"name": "extract", "uses": "sales.extract", "config": {"rows": 100, "seed": 7}},
    {"name": "load", "uses": "sales.load"}]})


def test_overrides_replace_keys_of_their_step_only() -> None:
    assert effective_config(SPEC, {"extract": {"rows": 5}}) == {
        "extract": {"rows": 5, "seed": 7}, "load": {}}
    assert effective_config(SPEC) == {"extract": {"rows": 100, "seed": 7}, "load": {}}


def test_a_base_replaces_the_registered_config() -> None:
    got = effective_config(SPEC, {"load": {"rows": 3}}, base={"extract": {"rows": 9}})
    assert got == {"extract": {"rows": 9}, "load": {"rows": 3}}


@pytest.mark.parametrize(("overrides", "loc"), [
    ({"nope": {}}, "config.nope"),
    ({"extract": {"rows": -1}}, "config.extract.rows"),
    ({"load": {"data_dir": "/etc"}}, "config.load"),
    ({"extract": 3}, "config.extract"),
    ([1], "config"),
])
def test_every_problem_is_named_by_its_place(overrides: object, loc: str) -> None:
    with pytest.raises(ConfigRefused) as refused:
        effective_config(SPEC, overrides)
    assert [p["loc"] for p in refused.value.problems] == [loc]
