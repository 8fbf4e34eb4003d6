"""The step implementations: the function each catalogued `uses` name runs.

The names, and the config each accepts, are `core.step_catalogue`'s (what the API checks a
definition against without importing this code); this module binds them to code, and a test
proves both name the same steps. A name missing here can never run.
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


def resolve(uses: str) -> StepFn:
    try:
        return STEPS[uses]
    except KeyError:
        raise UnknownStep(f"no step implementation named {uses!r}; "
                          f"known: {', '.join(sorted(STEPS))}") from None
