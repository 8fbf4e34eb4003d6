"""One batch id in two pipelines, on the real Kafka, Redis and Prefect (an idle work pool):
pipeline A's batch made by the API, then a run of that id published to pipeline B.

Prefect keeps an idempotency key unique per flow, and every pipeline's deployment is of the
one flow `run-pipeline`: B's run command, keyed by the bare batch id, got A's flow run back.
B's batch then reported A's run as its own (`scheduled`, later A's end as B's stop), and a
stop of B cancelled A's run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

import pytest
from redis.asyncio import Redis

from core import keys
from core.models import TAG_PIPELINE_PREFIX, new_batch_id
from core.packing import unpacked
from core.settings import Settings
from tests.test_commands_published import Ctx, spec
from tests.test_consumers_support import (
    Deployer,
    flow_runs,
    prefect,
    running,
    send_command,
    store_for,
    unique,
)


async def _fields(ctx: Ctx, pipeline_id: str, batch_id: str) -> dict[str, str]:
    return unpacked(cast(dict[str, str],
                         await ctx.redis.hgetall(keys.batch(pipeline_id, batch_id))))


@pytest.fixture
async def ctx(topics: Settings, redis: Redis) -> AsyncIterator[Ctx]:
    context = Ctx(topics, redis, Deployer(topics), unique("test-xpa"))
    await context.register()
    try:
        yield context
    finally:
        await context.deployer.cleanup(context.batches)


async def _two_pipelines_one_id(ctx: Ctx, *then: str) -> tuple[str, str]:
    """A's batch (as a POST makes it) and its run, then B's published run of the same id and
    the published commands `then` of B's batch, all processed: (B's pipeline, the id)."""
    other = unique("test-xpb")
    await ctx.register(pipeline_id=other)
    batch_id = new_batch_id()
    ctx.batches.append(batch_id)
    await store_for(ctx.redis, ctx.settings).create(ctx.pipeline_id, batch_id,
                                                     spec(ctx.pipeline_id))
    async with running(ctx.consumer()):
        await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
        await ctx.processed(1)
        await ctx.publish("run", batch_id, pipeline_id=other, create={})
        for kind in then:
            await ctx.publish(kind, batch_id, pipeline_id=other)
        await ctx.processed(2 + len(then))
    return other, batch_id


async def test_a_published_run_of_an_id_another_pipeline_has_gets_a_flow_run_of_its_own(
        ctx: Ctx) -> None:
    other, batch_id = await _two_pipelines_one_id(ctx)
    a = await ctx.fields(batch_id)
    b = await _fields(ctx, other, batch_id)
    assert a["state"] == b["state"] == "scheduled"
    assert b["flow_run_id"] != a["flow_run_id"]
    async with prefect(ctx.settings) as client:
        tags = {str(run.id): run.tags for run in await flow_runs(client, batch_id)}
    assert TAG_PIPELINE_PREFIX + ctx.pipeline_id in tags[a["flow_run_id"]]
    assert TAG_PIPELINE_PREFIX + other in tags[b["flow_run_id"]]


async def test_a_stop_of_the_second_pipelines_batch_leaves_the_first_ones_run_alone(
        ctx: Ctx) -> None:
    other, batch_id = await _two_pipelines_one_id(ctx, "stop")
    a = await ctx.fields(batch_id)
    b = await _fields(ctx, other, batch_id)
    assert (b["state"], b["outcome"]) == ("stop", "cancelled")
    assert a["state"] == "scheduled"
    async with prefect(ctx.settings) as client:
        states = {str(run.id): run.state_type.value for run in await flow_runs(client, batch_id)}
    assert states[a["flow_run_id"]] == "SCHEDULED"
    assert states[b["flow_run_id"]] in ("CANCELLED", "CANCELLING")
