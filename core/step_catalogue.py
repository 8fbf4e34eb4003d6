"""The catalogue of step implementations a pipeline definition's `uses` may name: plugins,
found through the Python entry-point group `dhub.steps` of the installed distributions.

Each entry point names a `StepDeclaration`: plain data (a one-line doc, the pydantic model of
the step's `config`, and the dotted paths of its run and clean-up functions), defined in a
module that imports no step code, no step SDK and no Prefect. So the API lists the steps
(`GET /api/v1/steps`) and checks a definition when it is registered (`PUT
/api/v1/pipelines/{id}` answers 400) by reading declarations only; the worker imports a run
function by its path when a batch runs it (`pipelines.steps.resolve`), and the consumers a
clean-up function when a batch is deleted.

Only declared names can run: a definition comes in over the API, and letting it name any
importable callable would let an API client choose what code the worker runs. Installing a
distribution is the operator's act, so that is where new code enters.

What a config may not say matters most: no key chooses a path on a worker's disk (data
locations are server settings: DHUB_DATA_DIR, each batch under <data_dir>/<batch_id>).
`batch_dir()` is that rule for plugins to call.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic.config import JsonDict

from core.models import valid_id

log = logging.getLogger(__name__)

GROUP: Final = "dhub.steps"
PATH_KEYS: Final = frozenset({"data_dir", "db_path"})
# "package.module:attribute": what an entry point's value looks like, so a typo in a
# declaration fails when it is loaded (listed, refused) rather than when a batch runs.
_DOTTED: Final = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass(frozen=True, slots=True)
class StepDeclaration:
    """One step implementation, as its plugin declares it.

    `run`: "module:function", the step `fn(ctx) -> None` (sync or async; see pipelines.sdk).
    `cleanup`: "module:function" called as `fn(data_root: Path, batch_id: str) -> None` when a
    batch that used the step is deleted; it must be idempotent (a delete may call it again).
    """

    name: str
    doc: str
    config: type[BaseModel]
    run: str
    cleanup: str | None = None

    def __post_init__(self) -> None:
        if not self.doc.strip() or "\n" in self.doc.strip():
            raise ValueError(f"step {self.name}: doc must be one line")
        if not (isinstance(self.config, type) and issubclass(self.config, BaseModel)):
            raise TypeError(f"step {self.name}: config must be a pydantic model class")
        for path in (self.run, self.cleanup):
            if path is not None and not _DOTTED.match(path):
                raise ValueError(f"step {self.name}: {path!r} is not 'module:function'")


class NoPaths(BaseModel):
    """A base for config models: refuses the keys that once chose a path on the worker."""

    @model_validator(mode="before")
    @classmethod
    def _no_paths(cls, data: Any) -> Any:
        # Named apart from other unknown keys: these were accepted once, and a client still
        # sending one should learn why it is refused now.
        if isinstance(data, Mapping):
            named = sorted(PATH_KEYS & set(data))
            if named:
                raise ValueError(
                    f"{', '.join(named)} may not be set in a step config: data locations are "
                    "server settings (DHUB_DATA_DIR; each batch writes under "
                    "<data_dir>/<batch_id>)")
        return data


# A config model marks the keys the data its step writes depends on (how many records, how
# split, which ones) with `Field(json_schema_extra=SHAPES_DATA)`: a resume may not change them
# for a step that started in the batch it resumes, since the step goes on over the data those
# values made (`core.run_config.resume_problems`). A mark in the schema, not a declaration
# field: GET /api/v1/steps shows it, and a plugin using it still loads in an older core.
SHAPES_DATA: Final[JsonDict] = {"shapes_data": True}


def shapes_data(config: type[BaseModel]) -> frozenset[str]:
    """The keys of `config` marked `SHAPES_DATA`."""
    return frozenset(name for name, field in config.model_fields.items()
                     if isinstance(field.json_schema_extra, dict)
                     and field.json_schema_extra.get("shapes_data") is True)


def batch_dir(data_root: Path, batch_id: str) -> Path:
    """<data_root>/<batch_id>, refusing an id that would name another directory."""
    # Batch ids are [A-Za-z0-9._-]; "." and ".." would name the data directory or its parent.
    if not valid_id(batch_id) or batch_id in (".", ".."):
        raise ValueError(f"batch id {batch_id!r} cannot name a data directory")
    return data_root / batch_id


def import_path(path: str) -> Any:
    """The object a "module:attribute" path names (imported now)."""
    module, _, attribute = path.partition(":")
    target: Any = importlib.import_module(module)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


@functools.cache
def declarations() -> Mapping[str, StepDeclaration]:
    """Every installed step implementation by name, loaded once per process (a newly
    installed plugin is seen by processes started after it; each flow run is one).

    A plugin that fails to load, whose config model has no JSON Schema, or a name two
    distributions declare, is left out and logged: it cannot be registered or run, and the
    other plugins still work."""
    found: dict[str, StepDeclaration] = {}
    owners: dict[str, list[str]] = {}
    for point in entry_points(group=GROUP):
        owner = point.dist.name if point.dist is not None else "?"
        try:
            declared = point.load()
        except Exception:
            log.exception("step plugin %s (from %s) failed to load; left out", point.name, owner)
            continue
        if not isinstance(declared, StepDeclaration) or declared.name != point.name:
            log.error("step plugin %s (from %s) is not a StepDeclaration named %s; left out",
                      point.name, owner, point.name)
            continue
        try:
            # What GET /api/v1/steps publishes and a config's JSON types are checked by:
            # a model without one would fail the whole list and each definition naming it.
            _properties(declared.config)
        except Exception:
            log.exception("step plugin %s (from %s): its config model has no JSON Schema; "
                          "left out", point.name, owner)
            continue
        owners.setdefault(point.name, []).append(owner)
        found[point.name] = declared
    for name, dists in owners.items():
        if len(dists) > 1:
            # Which code runs must not depend on install order.
            log.error("step %s is declared by %s; left out", name, ", ".join(sorted(dists)))
            del found[name]
    return MappingProxyType(dict(sorted(found.items())))


class _Catalogue(Mapping[str, type[BaseModel]]):
    """Name -> config model, read from the plugins when first used (not at import)."""

    def __getitem__(self, name: str) -> type[BaseModel]:
        return declarations()[name].config

    def __iter__(self) -> Iterator[str]:
        return iter(declarations())

    def __len__(self) -> int:
        return len(declarations())


CATALOGUE: Final[Mapping[str, type[BaseModel]]] = _Catalogue()


def known_steps() -> frozenset[str]:
    return frozenset(declarations())


def config_problems(uses: str, config: Mapping[str, Any], loc: str = "config",
                    given: Mapping[str, Any] | None = None) -> list[dict[str, str]]:
    """What is wrong with `config` for the step implementation `uses`, in the API's problem
    shape (`loc`, `msg`); empty when it is valid or `uses` is not catalogued (refused apart).
    `given`: the values the request itself brings (default: all of `config`), which must
    also be of the JSON type the published schema names: `"20"` or `true` is no integer,
    though the model (lax, as the worker reads a config) would take it. The values already
    held (a registered version's, a resumed batch's) are judged by the model alone, as when
    they were taken."""
    declared = declarations().get(uses)
    if declared is None:
        return []
    values = config if given is None else given
    problems = _type_problems(declared.config, values, loc)
    named = {problem["loc"] for problem in problems}  # one problem a key is enough
    model = _keeping_every_key(declared.config)
    try:
        model.model_validate(dict(config))
    except ValidationError as exc:
        for e in exc.errors():
            if (model is not declared.config and e["type"] == "extra_forbidden"
                    and e["loc"][0] not in values):
                continue  # held, a key its model drops: taken before, run as it always was
            problem = {"loc": ".".join([loc, *(str(p) for p in e["loc"])]), "msg": e["msg"]}
            if problem["loc"] not in named:
                problems.append(problem)
    return problems


@functools.cache
def _keeping_every_key(model: type[BaseModel]) -> type[BaseModel]:
    """`model`, refusing the keys it would drop. A model left at pydantic's `extra="ignore"`
    (a plugin's, subclassing NoPaths as the README says) takes an unknown key and drops it:
    the batch would show it in its `config` while its step, reading the config through the
    model, never sees it. One that keeps extras (`"allow"`) or refuses them is as it is."""
    if model.model_config.get("extra") in ("allow", "forbid"):
        return model
    return type(model.__name__, (model,), {"__module__": model.__module__,
                                           "__doc__": model.__doc__,
                                           "model_config": ConfigDict(extra="forbid")})


def published_schema(config: type[BaseModel]) -> dict[str, Any]:
    """The JSON Schema of a step's `config` as `config_problems` judges it: a key its model
    would drop is refused, so the schema says no other key is taken."""
    schema: dict[str, Any] = _keeping_every_key(config).model_json_schema()
    return schema


def _type_problems(model: type[BaseModel], values: Mapping[str, Any], loc: str
                   ) -> list[dict[str, str]]:
    properties = _properties(model)
    problems = []
    for key, value in values.items():
        wanted = _schema_types(properties.get(key, {}))
        if wanted and not _json_types(value) & wanted:
            problems.append({"loc": f"{loc}.{key}",
                             "msg": f"must be {' or '.join(sorted(wanted))} (as JSON), not "
                                    f"{_json_name(value)}"})
    return problems


@functools.cache
def _properties(model: type[BaseModel]) -> dict[str, Any]:
    properties: dict[str, Any] = published_schema(model).get("properties", {})
    return properties


def _schema_types(schema: Mapping[str, Any]) -> set[str]:
    """The JSON types a property's schema names; empty when it names none it can be judged
    by (a `$ref`, an `enum` alone: left to the model)."""
    stated = schema.get("type")
    if stated is not None:
        return set(stated) if isinstance(stated, list) else {stated}
    alternatives = schema.get("anyOf") or schema.get("oneOf") or []
    types = [_schema_types(alternative) for alternative in alternatives]
    return set().union(*types) if types and all(types) else set()


def _json_types(value: Any) -> set[str]:
    """The JSON Schema types `value` satisfies (an integral number is an integer)."""
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int):
        return {"integer", "number"}
    if isinstance(value, float):
        return {"integer", "number"} if value.is_integer() else {"number"}
    if isinstance(value, str):
        return {"string"}
    if isinstance(value, list):
        return {"array"}
    if isinstance(value, dict):
        return {"object"}
    return set()


def _json_name(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return orjson.dumps(value).decode()
