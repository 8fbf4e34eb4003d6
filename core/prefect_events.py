"""Prefect events → the project's events: one pure translation for the bridge and the webhook.

Input is a Prefect event as JSON (what `Event.model_dump(mode="json")` gives, which is also
what an automation webhook sends with a `{{ event.model_dump_json() }}` body). Only state
changes of dhub's own runs translate; anything else gives an empty list.

A batch is found from the run's tags (`core.models.flow_run_tags`), which Prefect attaches to
its events as related resources `prefect.tag.<tag>` — flow-run events from the server and
task-run events from the engine alike. The project's `event_id` is derived from Prefect's
event id, which for state changes is the id of the state itself: the bridge, a webhook and
the reconciler all name one transition the same way, so Redis applies it once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from core.codec import MAX_REASON, Event
from core.logs import scrub
from core.messages import MAX_TS_AHEAD_S
from core.models import batch_id_from_tags, is_uuid, valid_id

FLOW_RUN_PREFIX: Final = "prefect.flow-run."
TASK_RUN_PREFIX: Final = "prefect.task-run."
TAG_PREFIX: Final = "prefect.tag."
EVENT_ID_PREFIX: Final = "pf-"

# Prefect state type -> (batch state, outcome). By type, not name, so Late, AwaitingRetry,
# Retrying and the like follow their type. PAUSED says nothing the batch can show.
FLOW_STATES: Final[dict[str, tuple[str, str | None]]] = {
    "SCHEDULED": ("scheduled", None),
    "PENDING": ("scheduled", None),
    "RUNNING": ("running", None),
    "CANCELLING": ("running", None),
    "COMPLETED": ("stop", "completed"),
    "FAILED": ("stop", "failed"),
    "CANCELLED": ("stop", "cancelled"),
    "CRASHED": ("stop", "crashed"),
}
# Flow states that say `running` only of a run that had started: Prefect cancels a Pending run
# (claimed by a worker, never started: a stop's follow-up, the orphan sweep) through
# Cancelling too; only a Scheduled one goes straight to Cancelled.
IF_STARTED: Final = frozenset({"CANCELLING"})
# The states a run leaves for Cancelling once it had started.
STARTED_STATES: Final = frozenset({"RUNNING", "PAUSED"})
# Prefect state type -> step state. A SCHEDULED task run is one awaiting a retry: no change.
TASK_STATES: Final[dict[str, str]] = {
    "PENDING": "pending",
    "RUNNING": "running",
    "COMPLETED": "success",
    "FAILED": "failed",
    "CRASHED": "failed",
    "CANCELLED": "failed",
}
# Task states the engine gives a task run after its step may have ended by itself: a cancel
# or a kill landing after the step's SDK published `success` (its work durable, its offsets
# acknowledged) and before Prefect recorded Completed makes the task run Crashed. Their
# `failed` goes as a guess (ts 0), as the hooks' and the reconciler's do: it decides a step
# that reported no end, and loses to the end the step reported itself.
GUESSED_TASK_STATES: Final = frozenset({"CRASHED", "CANCELLED"})


class TranslateError(ValueError):
    """The payload is not a Prefect event at all (the webhook answers 400)."""


def event_id(prefect_event_id: str) -> str:
    return EVENT_ID_PREFIX + prefect_event_id


def flow_state_event(
    *,
    pipeline_id: str,
    batch_id: str,
    flow_run_id: str,
    state_type: str,
    state_id: str,
    message: str | None = None,
    ts: float | None = None,
    started: bool = True,
) -> Event | None:
    """The batch.state event for a flow run entering a state of `state_type`, or None.
    `started`: whether the run had started (known from where it came, or its start time)."""
    mapped = FLOW_STATES.get(state_type)
    if mapped is None or (state_type in IF_STARTED and not started):
        return None
    state, outcome = mapped
    event = Event(
        type="batch.state",
        batch_id=batch_id,
        pipeline_id=pipeline_id,
        event_id=event_id(state_id),
        state=state,
        outcome=outcome,
        flow_run_id=flow_run_id,
    )
    if ts is not None:
        event.ts = state_time(ts)
    if outcome is not None:
        event.reason = state_reason(message)
    return event


def state_reason(message: str | None) -> str | None:
    """A flow run state's message as its batch's `reason` (the flow's state hooks give the
    same for the same state: the two stops of one end must agree). A run's message quotes
    its exception, which may quote a URL with its password (httpx's errors do): the reason
    is shown to every reader of the batch."""
    return scrub(message)[:MAX_REASON] if message else None


def state_time(ts: float) -> float:
    """A Prefect state's time as the events codec takes it. One it refuses (before 1970, or more
    than a day ahead: a worker's clock far off) says nothing of when the run entered the
    state; kept, it had the event dead-lettered and the state lost, the reconciler's repair
    of it too. It counts as 0, a guess any real time beats, and the same guess each time the
    state is translated again (a replay): "now" would make each replay the latest stop."""
    if ts < 0 or ts > time.time() + MAX_TS_AHEAD_S:
        return 0.0
    return ts


def _tags(related: Iterable[Any]) -> list[str]:
    return [
        rid[len(TAG_PREFIX):]
        for r in related
        if isinstance(r, dict)
        and isinstance(rid := r.get("prefect.resource.id"), str)
        and rid.startswith(TAG_PREFIX)
    ]


def _owner(tags: list[str]) -> tuple[str, str] | None:
    owner = batch_id_from_tags(tags)
    if owner is None or not (valid_id(owner[0]) and valid_id(owner[1])):
        return None
    return owner


def _related_id(related: Iterable[Any], prefix: str) -> str | None:
    for r in related:
        if isinstance(r, dict):
            rid = r.get("prefect.resource.id")
            if isinstance(rid, str) and rid.startswith(prefix):
                return rid[len(prefix):]
    return None


def _timestamp(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    # Prefect writes UTC; a naive time read as local would shift by the host's offset.
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _had_started(event: dict[str, Any]) -> bool:
    """Whether the state the run left had started it: a state event's payload names it
    (`initial_state`); without it, not known, so not claimed."""
    payload = event.get("payload")
    initial = payload.get("initial_state") if isinstance(payload, dict) else None
    return isinstance(initial, dict) and initial.get("type") in STARTED_STATES


def _entered(event: dict[str, Any], resource: dict[str, Any]) -> float | None:
    """When the run entered the state: the state's own timestamp, else the event's time
    (the server emits state events with `occurred` = the state's timestamp). The latest stop
    decides a batch's outcome by this time, so a Completed that followed a Cancelled (Prefect
    allows Cancelled -> Running -> Completed) wins however late either arrives."""
    entered = _timestamp(resource.get("prefect.state-timestamp"))
    return entered if entered is not None else _timestamp(event.get("occurred"))


def translate(
    event: dict[str, Any], flow_runs: Mapping[str, tuple[str, str]] | None = None
) -> list[Event]:
    """The project's events for one Prefect event (empty when it is not about a dhub run).

    `flow_runs` optionally maps a flow run id to (pipeline_id, batch_id), for a task-run
    event that arrives without its flow run's tags. Raises `TranslateError` only when the
    payload does not have the shape of a Prefect event."""
    name = event.get("event")
    resource = event.get("resource")
    prefect_id = event.get("id")
    related = event.get("related", [])
    if not isinstance(name, str) or not isinstance(resource, dict) or not isinstance(related, list):
        raise TranslateError("expected an object with 'event', 'resource' and 'related'")
    if not isinstance(prefect_id, str) or not valid_id(event_id(prefect_id)):
        raise TranslateError("expected the event's 'id' (a UUID)")
    resource_id = resource.get("prefect.resource.id")
    state_type = resource.get("prefect.state-type")
    # Heartbeats and other non-state events carry no state type.
    if not isinstance(resource_id, str) or not isinstance(state_type, str):
        return []
    message = resource.get("prefect.state-message")
    ts = _entered(event, resource)

    if resource_id.startswith(FLOW_RUN_PREFIX):
        flow_run_id = resource_id[len(FLOW_RUN_PREFIX):]
        if not is_uuid(flow_run_id):
            # The events codec refuses it (it names no flow run): refused here, so the
            # webhook answers 400 instead of accepting an event that is then dead-lettered.
            raise TranslateError("expected a flow run's resource id to end in a UUID")
        owner = _owner(_tags(related))
        if owner is None:
            return []
        out = flow_state_event(
            pipeline_id=owner[0], batch_id=owner[1], flow_run_id=flow_run_id,
            state_type=state_type, state_id=prefect_id,
            message=message if isinstance(message, str) else None, ts=ts,
            started=_had_started(event),
        )  # fmt: skip
        return [out] if out is not None else []

    if resource_id.startswith(TASK_RUN_PREFIX):
        step_state = TASK_STATES.get(state_type)
        step = resource.get("prefect.resource.name")
        # A task run is named after its step only from Running on (task_run_name is
        # rendered then); its Pending event carries the generated `<task>-<suffix>` name,
        # which matches no step and is ignored downstream.
        if step_state is None or not isinstance(step, str) or not valid_id(step):
            return []
        owner = _owner(_tags(related))
        if owner is None and flow_runs is not None:
            parent = _related_id(related, FLOW_RUN_PREFIX)
            owner = flow_runs.get(parent) if parent else None
        if owner is None:
            return []
        step_event = Event(
            type="step.state", batch_id=owner[1], pipeline_id=owner[0],
            event_id=event_id(prefect_id), step=step, state=step_state,
        )  # fmt: skip
        if state_type in GUESSED_TASK_STATES:
            step_event.ts = 0.0
        elif ts is not None:
            step_event.ts = state_time(ts)
        return [step_event]
    return []
