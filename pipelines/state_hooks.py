"""Flow state hooks: the end of a run becomes `batch.state stop` with its outcome.

Prefect calls completion and failure hooks inside the flow's process, and cancellation and
crash hooks in the worker (or a hook process the worker starts) after the flow's process
ended: so each hook opens its own producer and reads the batch from the flow run's
parameters, never from the flow's memory.

A cancelled or crashed run's process cannot report its running step (it is being torn
down, or is gone), so those two hooks also mark `failed` the steps that started and did
not finish, as Prefect's task runs and the batch's Redis projection show them. Either view
may lag a little, so a step that completed just then may look unfinished: harmless, as the
step published its own `success` earlier on the same partition and the consumer keeps the
first final state. A failed run needs no such sweep: its failing step reported itself.
"""

from __future__ import annotations

import logging
from typing import Any, Final, cast

from prefect import Flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun, State
from prefect.flows import FlowStateHook

from core import keys
from core.connections import open_redis
from core.layout import running_steps
from core.models import valid_id
from core.packing import unpacked
from core.prefect_events import state_reason, state_time
from core.settings import Settings, get_settings
from pipelines.publisher import open_publisher

log = logging.getLogger(__name__)

# Outcomes whose process could not report its own running step.
SWEPT: Final = frozenset({"cancelled", "crashed"})

Hook = FlowStateHook[..., Any]


async def prefect_unfinished(flow_run: FlowRun) -> set[str]:
    """Steps whose task run Prefect recorded as started and not completed.

    Task run states reach the API as events, persisted a moment later: right after a
    crash the running step's task run may not be there yet."""
    async with get_client() as client:
        task_runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        )
    return {tr.name for tr in task_runs
            if valid_id(tr.name) and not (tr.state is not None and tr.state.is_completed())}


async def projected_running(settings: Settings, pipeline_id: str, batch_id: str) -> set[str]:
    """Steps the batch's Redis hash (the events consumer's projection) shows `running`:
    each step published `running` when it started, long before any crash."""
    redis = await open_redis(settings, tries=2)
    try:
        # decode_responses=True (see core.connections): keys and values are str
        fields = cast(dict[str, str], await redis.hgetall(keys.batch(pipeline_id, batch_id)))
    finally:
        await redis.aclose()
    return running_steps(unpacked(fields))


async def unfinished_steps(settings: Settings, flow_run: FlowRun, pipeline_id: str,
                           batch_id: str) -> set[str]:
    """Both views, each best effort: the stop matters more than the step states."""
    found: set[str] = set()
    try:
        found |= await prefect_unfinished(flow_run)
    except Exception:
        log.warning("could not read the task runs of %s", flow_run.id, exc_info=True)
    try:
        found |= await projected_running(settings, pipeline_id, batch_id)
    except Exception:
        log.warning("could not read batch %s from Redis", batch_id, exc_info=True)
    return found


async def publish_stop(flow_run: FlowRun, outcome: str, reason: str | None,
                       ts: float | None = None) -> None:
    """`ts`: when Prefect entered the final state. A hook may run long after (a cancellation
    hook in the worker, seconds later), and the latest stop decides the outcome: stamped
    with the hook's own time, a Cancelled that a Completed followed (Prefect allows
    Cancelled -> Running -> Completed) won over it."""
    batch_id = flow_run.parameters.get("batch_id")
    pipeline_id = flow_run.parameters.get("pipeline_id")
    if not isinstance(batch_id, str) or not isinstance(pipeline_id, str):
        log.error("flow run %s has no batch parameters; stop %s not published",
                  flow_run.id, outcome)
        return
    settings = get_settings()
    steps: set[str] = set()
    if outcome in SWEPT:
        steps = await unfinished_steps(settings, flow_run, pipeline_id, batch_id)
    async with open_publisher(settings, batch_id, pipeline_id) as events:
        for step in sorted(steps):
            # A guess (the sweep may read before a step's own end is recorded): ts 0, so any
            # real end of the step replaces it.
            await events.step_state(step, "failed", ts=0.0)
        await events.batch_state("stop", outcome=outcome, reason=reason,
                                 flow_run_id=str(flow_run.id), ts=ts)


def stop_hook(outcome: str) -> Hook:
    """A hook publishing `stop` with `outcome` and the state's message as the reason."""

    async def hook(flow: Flow[Any, Any], flow_run: FlowRun, state: State) -> None:
        # Through the bridge's range: a worker's clock far off must not make the stop fail.
        entered = (state_time(state.timestamp.timestamp()) if state.timestamp is not None
                   else None)
        await publish_stop(flow_run, outcome, state_reason(state.message), entered)

    # Prefect logs hooks by name ("Running hook 'publish_stop_failed' ...").
    hook.__name__ = hook.__qualname__ = f"publish_stop_{outcome}"
    return cast(Hook, hook)


on_completion = stop_hook("completed")
on_failure = stop_hook("failed")
on_cancellation = stop_hook("cancelled")
on_crashed = stop_hook("crashed")
