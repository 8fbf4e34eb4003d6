"""The generic flow `run-pipeline`: one flow for every pipeline, its steps as tasks.

Deployed once per pipeline as `run-pipeline/<pipeline name>` (see `pipelines.prefect_deployment`); the
worker loads it from this file. It reads the pipeline version's definition and the batch's
record from Redis, marks every step still to run `pending`, then runs them in order, each as
a task run named after the step, with the batch's effective config (the run's overrides
merged at creation; the registered config for a batch recorded without one). A step already
`success` (a resumed batch's, done by the batch it resumes) is not run again; a step with
offsets recorded starts from them (`ctx.start_offset`). A step that fails fails the flow,
and the steps after it stay `pending`.

Start-up cost: Prefect's engine imports this module before it reports the run Running, so
the module imports only Prefect and light modules; the clients (redis, aiokafka), the hooks,
the step SDK and the step implementations are imported inside the flow and the hooks, after
Running is on its way (that moved about a tenth of the engine's start past Running).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from prefect import Flow, flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun, State
from prefect.context import FlowRunContext

from core.models import FLOW_NAME, PipelineSpec
from core.settings import Settings, get_settings

if TYPE_CHECKING:
    from pipelines.publisher import EventPublisher


class DefinitionMissing(LookupError):
    """The run names a pipeline version that is not registered."""


async def load_definition(settings: Settings, pipeline_id: str, version: str,
                          batch_id: str | None = None) -> tuple[PipelineSpec, dict[str, str]]:
    """The version's definition, and the batch's hash (empty when `batch_id` is None or the
    batch is not recorded)."""
    from core import keys
    from core.connections import open_redis
    from core.packing import unpacked
    from core.registry import PipelineRegistry
    from core.scripts import Scripts

    redis = await open_redis(settings)
    try:
        spec = await PipelineRegistry(redis, Scripts(redis)).get(pipeline_id, version)
        fields = unpacked(cast(dict[str, str],
                               await redis.hgetall(keys.batch(pipeline_id, batch_id))
                               if batch_id is not None else {}))
    finally:
        await redis.aclose()
    if spec is None:
        raise DefinitionMissing(f"pipeline {pipeline_id} version {version} is not registered")
    return spec, fields


@dataclass(frozen=True, slots=True)
class StepRun:
    """How the flow runs one step of a batch."""

    name: str
    uses: str
    config: dict[str, Any]
    done: bool  # `success` already: not run again
    start: dict[str, int]  # offsets it starts from


def plan(spec: PipelineSpec, fields: Mapping[str, str]) -> list[StepRun]:
    """The batch's steps as its record says to run them (see the module's doc)."""
    from core import layout

    config = layout.config_of(fields) or {}
    return [StepRun(step.name, step.uses, dict(config.get(step.name, step.config)),
                    layout.step_state(fields, step.name) == "success",
                    layout.step_offsets(fields, step.name))
            for step in spec.steps]


# No caching or result persistence: a step's effect is its data and its events, and the
# publisher parameter is a live connection that must not be hashed or stored. No retries,
# whatever PREFECT_TASKS_DEFAULT_RETRIES says: a retry would run the step again from the
# start offsets planned before its first attempt, behind what that attempt reported (the
# batch keeps the higher offsets), so a retry stopped earlier leaves offsets ahead of the
# data. A failed step fails the run; `POST .../resume` goes on from its offsets.
@task(task_run_name="{step}", cache_policy=NO_CACHE, persist_result=False, retries=0)
async def step_task(step: str, uses: str, config: dict[str, Any],
                    events: EventPublisher, start: dict[str, int] | None = None,
                    resumed_from: str | None = None) -> dict[str, int]:
    """One step as a task run named after the step; returns its final offsets."""
    from pipelines.sdk import run_step
    from pipelines.steps import resolve

    ctx = await run_step(resolve(uses), events, step, config, get_settings(), start=start,
                         resumed_from=resumed_from)
    return ctx.offsets


def _hook(outcome: str) -> Any:
    """`pipelines.state_hooks`' stop hook for `outcome`, imported when the run ends, not before."""

    async def hook(flow: Flow[Any, Any], flow_run: FlowRun, state: State) -> None:
        from pipelines import state_hooks

        await getattr(state_hooks, f"on_{outcome}")(flow, flow_run, state)

    hook.__name__ = hook.__qualname__ = f"publish_stop_{outcome}"
    return hook


@flow(
    name=FLOW_NAME,
    persist_result=False,
    # Nor flow retries (PREFECT_FLOWS_DEFAULT_RETRIES): at once, they would plan from a
    # batch record the events consumer may not have brought up to the failed attempt yet.
    retries=0,
    on_completion=[_hook("completion")],
    on_failure=[_hook("failure")],
    on_cancellation=[_hook("cancellation")],
    on_crashed=[_hook("crashed")],
)
async def run_pipeline(batch_id: str, pipeline_id: str, pipeline_version: str) -> None:
    from core.layout import RESUMED_FROM
    from pipelines.publisher import open_publisher
    from pipelines.steps import resolve

    settings = get_settings()
    spec, fields = await load_definition(settings, pipeline_id, pipeline_version, batch_id)
    # Every `uses` resolved before anything runs: a bad definition fails with no step started.
    for spec_step in spec.steps:
        resolve(spec_step.uses)
    steps = [step for step in plan(spec, fields) if not step.done]
    resumed_from = fields.get(RESUMED_FROM)
    context = FlowRunContext.get()
    flow_run_id = str(context.flow_run.id) if context and context.flow_run else None
    async with open_publisher(settings, batch_id, pipeline_id) as events:
        await events.batch_state("running", flow_run_id=flow_run_id)
        for step in steps:
            await events.step_state(step.name, "pending")
        for step in steps:
            await step_task(step.name, step.uses, step.config, events, step.start,
                            resumed_from)
