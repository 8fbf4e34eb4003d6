"""The config model of each registered step, so a pipeline definition is refused when it is
registered (`PUT /api/v1/pipelines/{id}` answers 400) rather than when a batch runs.

This matters most for what a config may not say: no key chooses a path on a worker's disk
(data locations are server settings, see `pipelines.sales.config`).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from pydantic import BaseModel, ValidationError

from pipelines.sales.config import SalesConfig

CONFIGS: Final[Mapping[str, type[BaseModel]]] = MappingProxyType({
    "sales.extract": SalesConfig,
    "sales.transform": SalesConfig,
    "sales.load": SalesConfig,
})


def config_problems(uses: str, config: Mapping[str, Any], loc: str = "config"
                    ) -> list[dict[str, str]]:
    """What is wrong with `config` for the step implementation `uses`, in the API's problem
    shape (`loc`, `msg`); empty when it is valid or `uses` declares no model."""
    model = CONFIGS.get(uses)
    if model is None:
        return []
    try:
        model.model_validate(dict(config))
    except ValidationError as exc:
        return [{"loc": ".".join([loc, *(str(p) for p in e["loc"])]), "msg": e["msg"]}
                for e in exc.errors()]
    return []
