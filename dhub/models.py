"""The API's shapes as typed dicts (the contract's fields, plus the optional ones this service
adds beside them), and what a stopped batch's outcome means as an exit code.

Typed dicts, not classes: the JSON is used as it comes (a field the client does not know yet
passes through untouched, `--json` prints exactly what the API said) and costs no parsing.
"""

from __future__ import annotations

from typing import Final, NotRequired, TypedDict


class Progress(TypedDict, total=False):
    """A step's progress as the API computes it from offsets and totals (issue 11, part 3)."""

    percent: float | None
    records_per_s: float | None
    eta_s: float | None
    stalled: bool


class Step(TypedDict):
    state: str  # none | pending | running | success | failed
    offsets: dict[str, int]  # partition -> records processed
    totals: NotRequired[dict[str, int]]  # partition -> records in all, when the step reports them
    progress: NotRequired[Progress]
    stalled: NotRequired[bool]


class BatchState(TypedDict):
    state: str  # pending | scheduled | running | stop
    steps: dict[str, Step]
    stalled: NotRequired[bool]


class Batch(TypedDict):
    id: str
    name: str
    deployment: str
    state: BatchState
    pipeline_id: NotRequired[str]
    pipeline_version: NotRequired[str]
    created_at: NotRequired[str]
    updated_at: NotRequired[str]
    outcome: NotRequired[str]  # completed | failed | cancelled | crashed, once `stop`
    reason: NotRequired[str]
    flow_run_id: NotRequired[str]
    stalled: NotRequired[bool]  # running, offsets unmoved for DHUB_STALL_AFTER_S


class Page(TypedDict):
    items: dict[str, Batch]  # newest first
    token: str | None  # the next page's token; None on the last page


class PipelineVersion(TypedDict):
    name: str
    version: str
    steps: list[dict[str, object]]
    latest: bool


class Pipeline(TypedDict):
    id: str
    name: str
    deployment: str
    latest: str
    versions: list[PipelineVersion]
    created: NotRequired[bool]  # on a register: a new version (201) or the same again (200)


# The CLI's exit codes (also what `exit_code` answers for a batch).
EXIT_COMPLETED: Final = 0
EXIT_FAILED: Final = 1
EXIT_STOPPED: Final = 2  # cancelled, stopped or deleted
EXIT_ERROR: Final = 3  # usage, auth, connection, or the API refused the request

FAILED_OUTCOMES: Final = frozenset({"failed", "crashed"})


def is_final(batch: Batch) -> bool:
    return batch["state"]["state"] == "stop"


def exit_code(batch: Batch) -> int | None:
    """0 completed, 1 failed (or crashed), 2 cancelled or stopped; None while not `stop`.
    A batch without an `outcome` (a server that does not send it) is judged by its steps."""
    if not is_final(batch):
        return None
    outcome = batch.get("outcome")
    if outcome == "completed":
        return EXIT_COMPLETED
    if outcome in FAILED_OUTCOMES:
        return EXIT_FAILED
    if outcome is not None:
        return EXIT_STOPPED
    states = [step["state"] for step in batch["state"]["steps"].values()]
    if "failed" in states:
        return EXIT_FAILED
    if states and all(s == "success" for s in states):
        return EXIT_COMPLETED
    return EXIT_STOPPED
