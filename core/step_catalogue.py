"""The catalogue of step implementations a pipeline definition's `uses` may name, each with
the model of its `config`: plain data, so the API checks a definition when it is registered
(`PUT /api/v1/pipelines/{id}` answers 400) without importing the step code, its SDK or Prefect.

Only catalogued names can run: a definition comes in over the API, and letting it name any
importable callable would let an API client choose what code the worker runs.
`pipelines.steps` binds each name to its function; a test proves the two name the same steps.

What a config may not say matters most: no key chooses a path on a worker's disk (data
locations are server settings: DHUB_DATA_DIR, each batch under <data_dir>/<batch_id>).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PATH_KEYS: Final = frozenset({"data_dir", "db_path"})


class SalesConfig(BaseModel):
    """The config of every `sales.*` step: each step uses the keys it needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rows: int = Field(default=20_000, ge=0, le=10_000_000)
    partitions: int = Field(default=4, ge=1, le=256)
    seed: int = 42
    # Records per second per step; None runs at full speed. For demos and stop tests.
    throttle: float | None = Field(default=None, gt=0)
    # The name of a step that fails on purpose half way through its records.
    fail_at: str | None = None
    # Share of generated records made invalid on purpose, to exercise validation.
    invalid_rate: float = Field(default=0.0, ge=0.0, le=1.0)

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


# Step implementation name -> the model its config must satisfy.
CATALOGUE: Final[Mapping[str, type[BaseModel]]] = MappingProxyType({
    "sales.extract": SalesConfig,
    "sales.transform": SalesConfig,
    "sales.load": SalesConfig,
})


def known_steps() -> frozenset[str]:
    return frozenset(CATALOGUE)


def config_problems(uses: str, config: Mapping[str, Any], loc: str = "config"
                    ) -> list[dict[str, str]]:
    """What is wrong with `config` for the step implementation `uses`, in the API's problem
    shape (`loc`, `msg`); empty when it is valid or `uses` is not catalogued (refused apart)."""
    model = CATALOGUE.get(uses)
    if model is None:
        return []
    try:
        model.model_validate(dict(config))
    except ValidationError as exc:
        return [{"loc": ".".join([loc, *(str(p) for p in e["loc"])]), "msg": e["msg"]}
                for e in exc.errors()]
    return []
