"""The step catalogue's check of a config, without a server: a key the step's config model
would drop (a model left at pydantic's default `extra="ignore"`, as a plugin subclassing
`NoPaths` per the README is) is refused like any unknown key. Accepted, it was shown in the
batch's `config` while the step, reading the config through its model, never saw it."""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import EntryPoint
from typing import Any

import orjson
import pytest
from pydantic import BaseModel, ConfigDict, Field

from core import step_catalogue
from core.models import PipelineSpec, StepSpec
from core.run_config import ConfigRefused, effective_config
from core.step_catalogue import GROUP, NoPaths, StepDeclaration, config_problems, declarations


class Loose(NoPaths):
    """As the README has a plugin write its model: NoPaths, bounds, nothing about extras."""

    rows: int = Field(default=10, ge=0)
    fail_at: str | None = None


class Aliased(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    rows: int = Field(default=10, alias="row_count")


class Open(BaseModel):
    """A model that keeps every key it is given: its step sees them all."""

    model_config = ConfigDict(extra="allow")

    rows: int = 10


LOOSE = StepDeclaration(name="fake.loose", doc="Loose.", config=Loose, run="os:getcwd")
ALIASED = StepDeclaration(name="fake.aliased", doc="Aliased.", config=Aliased, run="os:getcwd")
OPEN = StepDeclaration(name="fake.open", doc="Open.", config=Open, run="os:getcwd")


@pytest.fixture(autouse=True)
def fake_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    points = [EntryPoint(name, f"{__name__}:{attr}", GROUP) for name, attr in
              (("fake.loose", "LOOSE"), ("fake.aliased", "ALIASED"), ("fake.open", "OPEN"))]
    monkeypatch.setattr(step_catalogue, "entry_points",
                        lambda group: points if group == GROUP else [])
    declarations.cache_clear()
    yield
    declarations.cache_clear()


def test_a_key_the_model_would_drop_is_refused() -> None:
    assert Loose.model_validate({"fail_att": "load"}).fail_at is None  # what the step reads
    assert [p["loc"] for p in config_problems("fake.loose", {"fail_att": "load"})] == [
        "config.fail_att"]
    spec = PipelineSpec(name="p", version="1", steps=[StepSpec(name="s", uses="fake.loose")])
    with pytest.raises(ConfigRefused) as refused:
        effective_config(spec, {"s": {"rows": 5, "fail_att": "s"}})
    assert [p["loc"] for p in refused.value.problems] == ["config.s.fail_att"]
    assert effective_config(spec, {"s": {"rows": 5, "fail_at": "s"}}) == {
        "s": {"rows": 5, "fail_at": "s"}}


def test_names_the_model_takes_and_models_keeping_extras_are_not_refused() -> None:
    assert config_problems("fake.aliased", {"row_count": 3}) == []
    assert config_problems("fake.aliased", {"rows": 3}) == []
    assert [p["loc"] for p in config_problems("fake.aliased", {"rowz": 3})] == ["config.rowz"]
    assert config_problems("fake.open", {"anything": [1]}) == []
    # The path keys keep their own reason.
    problems = config_problems("fake.loose", {"data_dir": "/etc"})
    assert len(problems) == 1 and "server settings" in problems[0]["msg"]


def test_a_dropped_key_already_held_is_not_refused_again() -> None:
    # A version registered (or a batch run) before such keys were refused: its overrides and
    # resumes are judged on what they bring, as the JSON types are.
    held: dict[str, Any] = {"fail_att": "s", "rows": 3}
    assert config_problems("fake.loose", {**held, "rows": 4}, given={"rows": 4}) == []
    assert [p["loc"] for p in config_problems("fake.loose", held, given={"fail_att": "t"})] == [
        "config.fail_att"]
    spec = PipelineSpec(name="p", version="1",
                        steps=[StepSpec(name="s", uses="fake.loose", config=held)])
    assert effective_config(spec, {"s": {"rows": 5}}) == {"s": {"fail_att": "s", "rows": 5}}


def test_the_published_schema_says_what_is_refused() -> None:
    from service import step_routes

    step_routes._body.cache_clear()
    try:
        items = orjson.loads(step_routes._body())["items"]
    finally:
        step_routes._body.cache_clear()
    assert items["fake.loose"]["config_schema"]["additionalProperties"] is False
    assert items["fake.loose"]["config_schema"]["title"] == "Loose"
    assert items["fake.open"]["config_schema"]["additionalProperties"] is True


class _Opaque:
    """A type pydantic can check but cannot describe in JSON Schema."""


class Undescribable(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    hook: _Opaque | None = None


UNDESCRIBABLE = StepDeclaration(name="fake.undescribable", doc="No schema.",
                                config=Undescribable, run="os:getcwd")


def test_a_plugin_whose_config_has_no_json_schema_is_left_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Its schema is what GET /api/v1/steps publishes and what the JSON types are checked
    by: the whole list answered 500, and every PUT or POST naming it too. Left out and
    logged, as a plugin that fails to load is; the others still work."""
    from service import step_routes

    points = [EntryPoint(name, f"{__name__}:{attr}", GROUP) for name, attr in
              (("fake.loose", "LOOSE"), ("fake.undescribable", "UNDESCRIBABLE"))]
    monkeypatch.setattr(step_catalogue, "entry_points",
                        lambda group: points if group == GROUP else [])
    declarations.cache_clear()
    step_routes._body.cache_clear()
    try:
        assert set(declarations()) == {"fake.loose"}
        assert set(orjson.loads(step_routes._body())["items"]) == {"fake.loose"}
    finally:
        step_routes._body.cache_clear()


def test_a_resume_over_a_step_whose_plugin_is_not_installed_here_changes_no_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Which keys shaped a step's data is its declaration's to say: with the plugin not
    installed in the API (uninstalled since, or only on the worker), a resume could change
    any key of the step going on over its data (`partitions` of a half-done extract), and a
    worker that has the plugin went on over data of another shape. Every key stays now."""
    from core.run_config import resume_problems

    monkeypatch.setattr(step_catalogue, "entry_points", lambda group: [])
    declarations.cache_clear()
    spec = PipelineSpec(name="p", version="1", steps=[
        StepSpec(name="extract", uses="sales.extract", config={"partitions": 2}),
        StepSpec(name="load", uses="sales.load")])
    base = {"extract": {"partitions": 2}, "load": {}}
    changed: dict[str, dict[str, Any]] = {"extract": {"partitions": 3},
                                          "load": {"fail_at": "load"}}
    problems = resume_problems(spec, base, changed, done=[], started="extract")
    assert [p["loc"] for p in problems] == ["config.extract.partitions"]


def test_a_refused_resume_over_an_undeclared_step_names_a_key_it_ran_without(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With the plugin not installed here, the config is compared as written, its defaults
    unknown: a key the batch ran without, given now (even as null: the worker's default may
    be another), is a change. The refusal said the batch "wrote with fail_at null", a value
    it never had (diff reviews)."""
    from core.run_config import resume_problems

    monkeypatch.setattr(step_catalogue, "entry_points", lambda group: [])
    declarations.cache_clear()
    spec = PipelineSpec(name="p", version="1", steps=[
        StepSpec(name="extract", uses="sales.extract", config={"partitions": 2})])
    base = {"extract": {"partitions": 2}}
    for given in (None, "extract"):
        changed: dict[str, dict[str, Any]] = {"extract": {"partitions": 2, "fail_at": given}}
        [problem] = resume_problems(spec, base, changed, done=[], started="extract")
        assert "wrote without fail_at" in problem["msg"], problem
    assert resume_problems(spec, base, {"extract": {"partitions": 2}}, done=["extract"],
                           started=None) == []
