"""The registry of step implementations: a step's `uses` names one of these.

Only registered names can run: a pipeline definition comes in over the API, and letting it
name any importable callable would let an API client choose what code the worker runs.
This module imports no Prefect, so the API can validate `uses` cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from pipelines.sales import steps as sales
from pipelines.sdk import StepFn

STEPS: Final[Mapping[str, StepFn]] = MappingProxyType({
    "sales.extract": sales.extract,
    "sales.transform": sales.transform,
    "sales.load": sales.load,
})


class UnknownStep(LookupError):
    """A `uses` that names no registered implementation."""


def known_steps() -> frozenset[str]:
    return frozenset(STEPS)


def resolve(uses: str) -> StepFn:
    try:
        return STEPS[uses]
    except KeyError:
        raise UnknownStep(f"no step implementation named {uses!r}; "
                          f"known: {', '.join(sorted(STEPS))}") from None
