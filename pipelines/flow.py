"""The generic flow `run-pipeline`: one flow for every pipeline, its steps as tasks.

Deployed once per pipeline as `run-pipeline/<pipeline name>` (see `pipelines.deploy`); the
worker loads it from this file. It reads the pipeline version's definition from Redis, marks
every step `pending`, then runs the steps in order, each as a task run named after the step.
A step that fails fails the flow, and the steps after it stay `pending`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from core.connections import open_redis
from core.models import FLOW_NAME, PipelineSpec
from core.registry import PipelineRegistry
from core.scripts import Scripts
from core.settings import Settings, get_settings
from pipelines import hooks
from pipelines.publisher import EventPublisher, open_publisher
from pipelines.sdk import run_step
from pipelines.steps import resolve


class DefinitionMissing(LookupError):
    """The run names a pipeline version that is not registered."""


async def load_definition(settings: Settings, pipeline_id: str, version: str) -> PipelineSpec:
    redis = await open_redis(settings)
    try:
        spec = await PipelineRegistry(redis, Scripts(redis)).get(pipeline_id, version)
    finally:
        await redis.aclose()
    if spec is None:
        raise DefinitionMissing(f"pipeline {pipeline_id} version {version} is not registered")
    return spec


# No caching or result persistence: a step's effect is its data and its events, and the
# publisher parameter is a live connection that must not be hashed or stored.
@task(task_run_name="{step}", cache_policy=NO_CACHE, persist_result=False)
async def step_task(step: str, uses: str, config: dict[str, Any],
                    events: EventPublisher) -> dict[str, int]:
    """One step as a task run named after the step; returns its final offsets."""
    ctx = await run_step(resolve(uses), events, step, config, get_settings())
    return ctx.offsets


@flow(
    name=FLOW_NAME,
    persist_result=False,
    on_completion=[hooks.on_completion],
    on_failure=[hooks.on_failure],
    on_cancellation=[hooks.on_cancellation],
    on_crashed=[hooks.on_crashed],
)
async def run_pipeline(batch_id: str, pipeline_id: str, pipeline_version: str) -> None:
    settings = get_settings()
    spec = await load_definition(settings, pipeline_id, pipeline_version)
    # Every `uses` resolved before anything runs: a bad definition fails with no step started.
    for step in spec.steps:
        resolve(step.uses)
    context = FlowRunContext.get()
    flow_run_id = str(context.flow_run.id) if context and context.flow_run else None
    async with open_publisher(settings, batch_id, pipeline_id) as events:
        await events.batch_state("running", flow_run_id=flow_run_id)
        for step in spec.steps:
            await events.step_state(step.name, "pending")
        for step in spec.steps:
            await step_task(step.name, step.uses, dict(step.config), events)
