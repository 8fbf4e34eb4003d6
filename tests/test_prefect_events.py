"""The Prefect → project event translation, on real Prefect events.

`tests/data/prefect_events.json` holds events captured from a Prefect 3.9.1 server's event
stream while a deployment of `run-pipeline` ran on a process worker: one run completed, one
failed in `transform`, one was cancelled while running, one had its process SIGKILLed.
"""

from __future__ import annotations

import copy
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.codec import decode_event
from core.prefect_events import TranslateError, flow_state_event, translate

DATA = orjson.loads((Path(__file__).parent / "data" / "prefect_events.json").read_bytes())


def real(name: str) -> dict[str, Any]:
    return copy.deepcopy(DATA[name])


@pytest.mark.parametrize(
    ("name", "state", "outcome"),
    [
        ("flow_run_scheduled", "scheduled", None),
        ("flow_run_pending", "scheduled", None),
        ("flow_run_submitting", "scheduled", None),
        ("flow_run_running", "running", None),
        ("flow_run_cancelling", "running", None),
        ("flow_run_completed", "stop", "completed"),
        ("flow_run_failed", "stop", "failed"),
        ("flow_run_cancelled", "stop", "cancelled"),
        ("flow_run_crashed", "stop", "crashed"),
    ],
)
def test_flow_run_states_map_to_batch_states(name: str, state: str, outcome: str | None) -> None:
    event = real(name)
    [out] = translate(event)
    assert out.type == "batch.state"
    assert (out.state, out.outcome) == (state, outcome)
    assert out.pipeline_id == "cap-pipe"
    assert out.batch_id.startswith("batch-cap")
    assert out.flow_run_id == event["resource"]["prefect.resource.id"].removeprefix(
        "prefect.flow-run.")
    assert out.event_id == "pf-" + event["id"]
    # What the bridge produces must pass the events consumer's strict decoder unchanged.
    decoded = decode_event(out.encode())
    assert decoded.to_dict() == out.to_dict()


def test_terminal_states_keep_prefects_message_as_reason() -> None:
    [failed] = translate(real("flow_run_failed"))
    assert failed.reason is not None and "boom at 99" in failed.reason
    [crashed] = translate(real("flow_run_crashed"))
    assert crashed.reason is not None and "SIGKILL" in crashed.reason
    [running] = translate(real("flow_run_running"))
    assert running.reason is None


def test_timestamp_is_when_the_run_entered_the_state() -> None:
    event = real("flow_run_completed")
    [out] = translate(event)
    occurred = datetime.fromisoformat(event["occurred"].replace("Z", "+00:00"))
    assert out.ts == pytest.approx(occurred.timestamp())
    # The state's own timestamp first, the event's time without it (UTC when naive).
    event["resource"]["prefect.state-timestamp"] = "2021-01-01T00:00:00+00:00"
    event["occurred"] = "2020-01-01T00:00:00Z"
    [out] = translate(event)
    assert out.ts == 1609459200.0
    del event["resource"]["prefect.state-timestamp"]
    [out] = translate(event)
    assert out.ts == 1577836800.0
    event["occurred"] = "2020-01-01T00:00:00"
    [out] = translate(event)
    assert out.ts == 1577836800.0


def test_a_completed_after_a_cancelled_carries_the_later_ts() -> None:
    """Prefect allows Cancelled -> Running -> Completed (a stop that lands while a worker
    claims the run): the batch's outcome follows the stop with the greatest ts, so the
    Completed state must carry the later time, whichever the bridge forwards first."""
    cancelled = real("flow_run_cancelled")
    completed = real("flow_run_cancelled")
    completed["id"] = "0f0f0f0f-0000-4000-8000-000000000001"
    completed["resource"]["prefect.state-type"] = "COMPLETED"
    completed["resource"]["prefect.state-name"] = "Completed"
    completed["resource"]["prefect.state-message"] = ""
    completed["resource"]["prefect.state-timestamp"] = "2026-11-27T23:29:02.000001+00:00"
    completed["occurred"] = "2026-11-27T23:29:02.000001Z"
    [late] = translate(completed)
    [early] = translate(cancelled)
    assert (early.outcome, late.outcome) == ("cancelled", "completed")
    assert late.ts > early.ts
    assert late.ts == datetime.fromisoformat("2026-11-27T23:29:02.000001+00:00").timestamp()


@pytest.mark.parametrize(
    ("name", "step", "state"),
    [
        ("task_run_running", "extract", "running"),
        ("task_run_completed", "extract", "success"),
        ("task_run_failed", "transform", "failed"),
        ("task_run_crashed", "transform", "failed"),
    ],
)
def test_task_run_states_map_to_step_states(name: str, step: str, state: str) -> None:
    event = real(name)
    [out] = translate(event)
    assert (out.type, out.step, out.state) == ("step.state", step, state)
    assert out.event_id == "pf-" + event["id"]
    assert decode_event(out.encode()).to_dict() == out.to_dict()


def test_task_run_pending_carries_the_generated_name_not_the_step() -> None:
    # Prefect renders task_run_name only when the task starts running.
    [out] = translate(real("task_run_pending"))
    assert out.state == "pending"
    assert out.step is not None and out.step.startswith("step-")


def test_task_run_cancelled_maps_to_failed() -> None:
    event = real("task_run_crashed")
    event["event"] = "prefect.task-run.Cancelled"
    event["resource"]["prefect.state-type"] = "CANCELLED"
    [out] = translate(event)
    assert out.state == "failed"


def test_task_run_without_tags_is_found_through_its_flow_run() -> None:
    event = real("task_run_running")
    event["related"] = [r for r in event["related"] if r["prefect.resource.role"] != "tag"]
    assert translate(event) == []
    flow_run_id = next(r["prefect.resource.id"] for r in event["related"]
                       if r["prefect.resource.role"] == "flow-run").removeprefix("prefect.flow-run.")
    [out] = translate(event, {flow_run_id: ("cap-pipe", "batch-x")})
    assert (out.pipeline_id, out.batch_id, out.step) == ("cap-pipe", "batch-x", "extract")


def test_irrelevant_events_translate_to_nothing() -> None:
    assert translate(real("flow_run_heartbeat")) == []
    not_ours = real("flow_run_running")
    not_ours["related"] = [r for r in not_ours["related"]
                           if "dhub-batch" not in r["prefect.resource.id"]]
    assert translate(not_ours) == []
    paused = real("flow_run_running")
    paused["resource"]["prefect.state-type"] = "PAUSED"
    assert translate(paused) == []
    retry = real("task_run_running")
    retry["resource"]["prefect.state-type"] = "SCHEDULED"  # AwaitingRetry
    assert translate(retry) == []
    other = real("flow_run_running")
    other["resource"]["prefect.resource.id"] = "prefect.deployment.0000"
    assert translate(other) == []


def test_unusable_ids_in_tags_or_names_are_ignored() -> None:
    bad_batch = real("flow_run_running")
    for r in bad_batch["related"]:
        if r["prefect.resource.id"].startswith("prefect.tag.dhub-batch:"):
            r["prefect.resource.id"] = "prefect.tag.dhub-batch:has space"
    assert translate(bad_batch) == []
    bad_step = real("task_run_running")
    bad_step["resource"]["prefect.resource.name"] = "no/slashes"
    assert translate(bad_step) == []


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"event": "prefect.flow-run.Running"},
        {"event": 1, "resource": {}, "related": [], "id": "x"},
        {"event": "prefect.flow-run.Running", "resource": [], "related": [], "id": "x"},
        {"event": "prefect.flow-run.Running", "resource": {}, "related": {}, "id": "x"},
        {"event": "prefect.flow-run.Running", "resource": {}, "related": []},
        {"event": "prefect.flow-run.Running", "resource": {}, "related": [], "id": "a b"},
    ],
)
def test_payloads_that_are_not_prefect_events_are_refused(payload: dict[str, Any]) -> None:
    with pytest.raises(TranslateError):
        translate(payload)
    assert issubclass(TranslateError, ValueError)  # the webhook's 400


def test_state_event_helper_is_what_translate_uses() -> None:
    event = real("flow_run_cancelled")
    [out] = translate(event)
    direct = flow_state_event(
        pipeline_id=out.pipeline_id, batch_id=out.batch_id, flow_run_id=out.flow_run_id or "",
        state_type="CANCELLED", state_id=event["id"],
        message=event["resource"]["prefect.state-message"], ts=out.ts,
    )
    assert direct is not None and direct.to_dict() == out.to_dict()
    assert flow_state_event(pipeline_id="p", batch_id="b", flow_run_id="f",
                            state_type="PAUSED", state_id="s") is None
