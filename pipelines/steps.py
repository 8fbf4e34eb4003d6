"""The step implementations: the function each declared `uses` name runs.

The names, the config each accepts and the path of its code are the plugins' declarations
(`core.step_catalogue`, entry-point group `dhub.steps`), which the API reads without importing
any step code; this module imports a step's code only when the worker runs it. A name no
installed plugin declares can never run.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Final

from core.step_catalogue import declarations, import_path
from pipelines.sdk import StepFn


class UnknownStep(LookupError):
    """A `uses` that names no registered implementation."""


def resolve(uses: str) -> StepFn:
    declared = declarations().get(uses)
    if declared is None:
        raise UnknownStep(f"no step implementation named {uses!r}; "
                          f"known: {', '.join(declarations())}")
    fn = import_path(declared.run)
    if not callable(fn):
        raise UnknownStep(f"step {uses}: {declared.run} is not callable")
    step: StepFn = fn
    return step


class _Steps(Mapping[str, StepFn]):
    """Name -> step function for every declared step, imported when looked up."""

    def __getitem__(self, uses: str) -> StepFn:
        try:
            return resolve(uses)
        except UnknownStep:
            raise KeyError(uses) from None

    def __iter__(self) -> Iterator[str]:
        return iter(declarations())

    def __len__(self) -> int:
        return len(declarations())


STEPS: Final[Mapping[str, StepFn]] = _Steps()
