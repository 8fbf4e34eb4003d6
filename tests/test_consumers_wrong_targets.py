"""Commands and records that name the wrong thing, on the real Kafka, Redis and Prefect (an
idle work pool: flow runs stay Scheduled): a flow run id that is no UUID held by a hash (the
codec refuses one now; a hash may hold one from before), a delete naming another pipeline
than its batch's, and a batch id long enough that an event id derived from it passed the
events' 128 characters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import pytest
from prefect.states import Crashed
from redis.asyncio import Redis

from consumers.commands import CommandsConsumer
from consumers.plumbing.active import ActiveRuns
from consumers.plumbing.cleanup import Cleanup
from consumers.plumbing.prefect_api import PrefectGateway
from core import keys
from core.codec import decode_event
from core.packing import unpacked
from core.registry import PipelineRegistry
from core.scripts import Scripts
from core.settings import Settings
from tests.conftest import eventually
from tests.helpers import read_topic
from tests.test_consumers_support import (
    Deployer,
    committed,
    make_spec,
    options,
    running,
    send_command,
    store_for,
    unique,
)
from tests.test_reconciler_support import idle_pool, reconciler_without_sweep

NOT_A_UUID = "run-42"


async def _fields(redis: Redis, pipeline_id: str, batch_id: str) -> dict[str, str]:
    return unpacked(cast(dict[str, str], await redis.hgetall(keys.batch(pipeline_id, batch_id))))


@asynccontextmanager
async def _cleanup(topics: Settings, redis: Redis) -> AsyncIterator[tuple[Cleanup, PrefectGateway]]:
    """The commands consumer's clean-up of stops and deletes, on its own Prefect gateway."""
    opts = options()
    gateway = PrefectGateway(topics, opts.prefect_timeout_s)
    await gateway.open()
    try:
        yield (Cleanup(redis, gateway, store_for(redis, topics), ActiveRuns(redis), opts,
                       asyncio.Event()), gateway)
    finally:
        await gateway.close()


@pytest.mark.timeout(90)
async def test_a_flow_run_id_that_is_no_uuid_does_not_blind_the_reconciler(
        topics: Settings, redis: Redis) -> None:
    """`UUID("run-42")` raised in every round that read it: the other batches' missed
    states (here A's crash) were never published."""
    async with idle_pool(topics, redis) as pool:
        crashed = await pool.batch()
        crashed_run = await pool.scheduled(crashed)
        await pool.client.set_flow_run_state(crashed_run, Crashed(message="lost"), force=True)
        bad = await pool.batch()
        await ActiveRuns(redis).add(pool.pipeline_id, bad)
        await redis.hset(keys.batch(pool.pipeline_id, bad), "flow_run_id", NOT_A_UUID)
        async with reconciler_without_sweep(topics, reconcile_batch=500, zombie_after_s=0) as reconciler:
            events = await reconciler.reconcile()
    stops = {e.batch_id: e.outcome for e in events if e.state == "stop"}
    assert stops.get(crashed) == "crashed", stops


@pytest.mark.timeout(90)
async def test_a_stop_cancels_the_batchs_run_whatever_id_its_hash_holds(
        topics: Settings, redis: Redis) -> None:
    async with idle_pool(topics, redis) as pool:
        batch_id = await pool.batch()
        real_run = await pool.scheduled(batch_id, record=False)  # found by its tags
        await redis.hset(keys.batch(pool.pipeline_id, batch_id), "flow_run_id", NOT_A_UUID)
        async with _cleanup(topics, redis) as (cleanup, _):
            await cleanup.one_pass("stop", pool.pipeline_id, batch_id, since=0.0)
        assert await pool.state_of(real_run) == "CANCELLED"


@pytest.mark.timeout(90)
async def test_a_delete_naming_another_pipeline_leaves_the_batch_of_that_id_alone(
        topics: Settings, redis: Redis) -> None:
    """The clean-up found flow runs by the batch's tag alone: a delete published with the
    wrong pipeline_id cancelled (and would have deleted) the run of that id's batch in
    another pipeline, which then ended `cancelled` for nothing."""
    async with idle_pool(topics, redis) as pool:
        batch_id = await pool.batch()
        run = await pool.scheduled(batch_id)
        async with _cleanup(topics, redis) as (cleanup, gateway):
            await cleanup.one_pass("delete", "some-other-pipeline", batch_id, since=0.0)
            # The batch's own pipeline still reaches it.
            assert [r.flow_run_id for r in await gateway.of_batch(pool.pipeline_id, batch_id)] \
                == [run]
        assert (await _fields(redis, pool.pipeline_id, batch_id))["state"] == "scheduled"
        assert await pool.state_of(run) == "SCHEDULED"


@pytest.mark.timeout(90)
async def test_the_stop_event_of_a_batch_with_a_128_character_id_is_one_the_codec_takes(
        topics: Settings, redis: Redis) -> None:
    """`stop-<batch id>` was 133 characters for a published batch of 128: applied to Redis
    directly, while its copy on the events topic (what snapshots and a rebuild go by) was
    dead-lettered."""
    pipeline_id = unique("long-id")
    spec = make_spec(pipeline_id)
    batch_id = "batch-" + "x" * 122
    await PipelineRegistry(redis, Scripts(redis)).register(pipeline_id, spec)
    await store_for(redis, topics).create(pipeline_id, batch_id, spec)
    consumer = CommandsConsumer(topics, options(), ensure=Deployer(topics).ensure)
    async with running(consumer):
        await send_command(topics, "stop", pipeline_id, batch_id)

        async def done() -> bool:
            return await committed(topics, topics.group_commands, topics.topic_commands) >= 1
        await eventually(done, timeout=20)
    fields = await _fields(redis, pipeline_id, batch_id)
    assert (fields["state"], fields["outcome"]) == ("stop", "cancelled")
    [record] = await read_topic(topics, topics.topic_events, lambda rs: len(rs) >= 1, 10)
    event = decode_event(record.value)
    assert (event.batch_id, event.state) == (batch_id, "stop")
    assert len(event.event_id) <= 128


@pytest.mark.timeout(90)
async def test_a_stop_leaves_alone_another_pipelines_run_that_its_hash_names(
        topics: Settings, redis: Redis) -> None:
    """A batch whose hash holds the run of its id's batch in another pipeline (recorded before
    a created run's pipeline was checked: Prefect hands back a run by its idempotency key, the
    batch id, across pipelines): its stop cancelled that other batch's run."""
    async with idle_pool(topics, redis) as pool:
        batch_id = await pool.batch()
        run = await pool.scheduled(batch_id)
        other = unique("other-pipeline")
        spec = make_spec(other)
        await PipelineRegistry(redis, Scripts(redis)).register(other, spec)
        await store_for(redis, topics).create(other, batch_id, spec)
        await redis.hset(keys.batch(other, batch_id), "flow_run_id", run)
        async with _cleanup(topics, redis) as (cleanup, gateway):
            await cleanup.one_pass("stop", other, batch_id, since=0.0)
            assert await gateway.of_batch(other, batch_id, run) == []
        assert await pool.state_of(run) == "SCHEDULED"
