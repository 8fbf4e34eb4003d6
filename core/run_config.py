"""A batch's effective step config: the pipeline version's registered config of each step,
with the run's per-step overrides merged over it (key by key), checked by each step
implementation's config model. The API's POST and resume, and a `run` command published
straight to Kafka, all go through `effective_config`, so they accept and refuse alike.

Overrides have the shape `{"<step name>": {"<config key>": <value>, ...}, ...}`; a key set to
a value replaces the registered one (null included: it is a value for the model to judge).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import TypeAdapter, ValidationError

from core.models import ConfigValue, PipelineSpec
from core.step_catalogue import config_problems

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
        merged = {**start, **checked.get(step.name, {})}
        problems += config_problems(step.uses, merged, loc=f"config.{step.name}")
        result[step.name] = merged
    if problems:
        raise ConfigRefused(problems)
    return result
