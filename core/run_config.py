"""A batch's effective step config: the pipeline version's registered config of each step,
with the run's per-step overrides merged over it (key by key), checked by each step
implementation's config model. The API's POST and resume, and a `run` command published
straight to Kafka, all go through `effective_config`, so they accept and refuse alike.

Overrides have the shape `{"<step name>": {"<config key>": <value>, ...}, ...}`; a key set to
a value replaces the registered one (null included: it is a value for the model to judge).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError

from core.models import ConfigValue, PipelineSpec
from core.step_catalogue import config_problems, declarations, shapes_data

Problems = list[dict[str, str]]
_OVERRIDES: TypeAdapter[dict[str, dict[str, ConfigValue]]] = TypeAdapter(
    dict[str, dict[str, ConfigValue]])


class ConfigRefused(ValueError):
    """What is wrong with a run's config, in the API's problem shape (`loc`, `msg`)."""

    def __init__(self, problems: Problems) -> None:
        super().__init__("; ".join(f"{p['loc']}: {p['msg']}" for p in problems))
        self.problems = problems


def effective_config(spec: PipelineSpec, overrides: object = None,
                     base: Mapping[str, Mapping[str, Any]] | None = None
                     ) -> dict[str, dict[str, Any]]:
    """Step name -> its config for this run. `base` replaces the registered config as the
    starting point (a resume starts from the old batch's effective config). Raises
    ConfigRefused listing every problem at once."""
    if overrides is None:
        overrides = {}
    try:
        checked = _OVERRIDES.validate_python(overrides)
    except ValidationError as exc:
        raise ConfigRefused([{"loc": ".".join(["config", *(str(p) for p in e["loc"])]),
                              "msg": e["msg"]} for e in exc.errors()]) from None
    names = spec.step_names
    problems: Problems = [
        {"loc": f"config.{name}",
         "msg": f"no step named {name!r} in this pipeline version; its steps: {', '.join(names)}"}
        for name in checked if name not in names]
    result: dict[str, dict[str, Any]] = {}
    for step in spec.steps:
        start = base.get(step.name, step.config) if base is not None else step.config
        given = checked.get(step.name, {})
        merged = {**start, **given}
        problems += config_problems(step.uses, merged, loc=f"config.{step.name}", given=given)
        result[step.name] = merged
    if problems:
        raise ConfigRefused(problems)
    return result


def resume_problems(spec: PipelineSpec, base: Mapping[str, Mapping[str, Any]],
                    config: Mapping[str, Mapping[str, Any]], done: Collection[str],
                    started: str | None) -> Problems:
    """What a resume's effective `config` changes that the batch it resumes already did with
    `base`: any key of a step that is `done` (it does not run again: its output is taken
    over as it is), and the keys that shape the data (`step_catalogue.SHAPES_DATA`) of the
    step that `started` and goes on over its data (every key when its implementation is not
    declared in this process). Values are compared as the step's model reads them, so
    restating a value, or its default (`"fail_at": null`), changes nothing; a step not
    declared here is compared as written (its defaults unknown: a key given that the batch
    ran without changes it, even as null)."""
    problems: Problems = []
    for step in spec.steps:
        if step.name not in done and step.name != started:
            continue
        before = _as_read(step.uses, base.get(step.name, step.config))
        after = _as_read(step.uses, config.get(step.name, step.config))
        fixed = set(before) | set(after)
        declared = declarations().get(step.uses)
        if step.name not in done and declared is not None:
            # Not declared here (uninstalled, or on the worker only): which keys shaped the
            # data is unknown, so none may change.
            fixed &= shapes_data(declared.config)
        problems += [
            {"loc": f"config.{step.name}.{key}",
             "msg": f"step {step.name} is done: it will not run again, so its config stays "
                    f"as it ran ({_as_ran(before, key)})" if step.name in done else
                    f"step {step.name} goes on over the data it wrote "
                    f"{_as_ran(before, key)}: a resume cannot change it (run a new batch)"}
            for key in sorted(fixed) if before.get(key, _UNSET) != after.get(key, _UNSET)]
    return problems


_UNSET = object()


def _as_ran(config: Mapping[str, Any], key: str) -> str:
    """`key` as the batch ran with it, as the client wrote it (null, not None)."""
    if key not in config:
        return f"without {key}"
    return f"with {key} {orjson.dumps(config[key]).decode()}"


def _as_read(uses: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` with its model's defaults filled in (as given when `uses` is not catalogued
    or its model no longer takes it: then only what was written can be compared)."""
    declared = declarations().get(uses)
    if declared is None:
        return dict(config)
    try:
        return declared.config.model_validate(dict(config)).model_dump()
    except ValidationError:
        return dict(config)
