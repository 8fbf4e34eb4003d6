"""The commands consumer on the real Kafka, Redis and Prefect server.

Deployments here live on a work pool no worker polls, so their runs stay Scheduled and a
stop finds them "not yet running" deterministically.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from consumers.commands import CommandsConsumer
from consumers.plumbing import dlq
from core import keys
from core.codec import decode_event
from core.keys import CLEANUP_DUE, CLEANUP_SINCE
from core.settings import Settings
from tests.conftest import eventually
from tests.helpers import read_topic
from tests.test_consumers_support import (
    Deployer,
    PipelineCtx,
    committed,
    flow_runs,
    make_spec,
    near_the_size_limit,
    options,
    prefect,
    running,
    send,
    send_command,
    store_for,
    unique,
)


class Ctx(PipelineCtx):
    def consumer(self, settings: Settings | None = None, **opts: Any) -> CommandsConsumer:
        return CommandsConsumer(settings or self.settings, options(**opts),
                                ensure=self.deployer.ensure)

    async def processed(self, count: int) -> None:
        """Waits until the group has committed `count` commands."""
        async def done() -> bool:
            s = self.settings
            return await committed(s, s.group_commands, s.topic_commands) >= count
        await eventually(done, timeout=20)


@pytest.fixture
async def ctx(topics: Settings, redis: Redis) -> AsyncIterator[Ctx]:
    context = Ctx(topics, redis, Deployer(topics), unique("test-cmd"))
    try:
        yield context
    finally:
        await context.deployer.cleanup(context.batches)


async def test_run_creates_one_flow_run_even_when_delivered_twice(ctx: Ctx) -> None:
    batch_id = await ctx.batch()
    async with running(ctx.consumer()):
        await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
        await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
        await ctx.processed(2)
    fields = await ctx.fields(batch_id)
    assert fields["state"] == "scheduled"
    async with prefect(ctx.settings) as client:
        runs = await flow_runs(client, batch_id)
    assert [str(r.id) for r in runs] == [fields["flow_run_id"]]
    run = runs[0]
    assert run.parameters == {"batch_id": batch_id, "pipeline_id": ctx.pipeline_id,
                              "pipeline_version": "1"}
    assert {"dhub", f"dhub-batch:{batch_id}", f"dhub-pipeline:{ctx.pipeline_id}",
            "dhub-version:1"} <= set(run.tags)
    assert run.idempotency_key == batch_id
    assert ctx.deployer.calls == 1  # the deployment id is cached per pipeline version
    # The scheduled event is on the topic (Redis is rebuildable from it); a second delivery
    # that finds the run recorded creates nothing and publishes nothing new.
    records = await read_topic(ctx.settings, ctx.settings.topic_events, lambda r: len(r) >= 1)
    events = [decode_event(r.value) for r in records]
    assert {(e.state, e.flow_run_id, e.event_id) for e in events} == {
        ("scheduled", str(run.id), f"sched-{run.id}")}
    assert all(r.key == batch_id.encode() for r in records)


async def test_a_run_created_is_announced_to_its_work_pools_worker(ctx: Ctx,
                                                                    redis: Redis) -> None:
    # The stack's worker polls Prefect only every few seconds; the nudge is what starts a run
    # at once (pipelines/worker_nudges.py).
    batch_id = await ctx.batch()
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(keys.WORKER_NUDGES_CHANNEL)
        async with running(ctx.consumer()):
            await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
            await ctx.processed(1)
        nudges: list[str] = []

        async def nudged() -> bool:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if message is not None:
                nudges.append(message["data"])
            return ctx.settings.work_pool in nudges
        await eventually(nudged, timeout=10)
    assert (await ctx.fields(batch_id))["state"] == "scheduled"


async def test_stop_before_running_cancels_and_a_later_run_does_nothing(ctx: Ctx) -> None:
    batch_id = await ctx.batch()
    async with running(ctx.consumer()):
        await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
        await ctx.processed(1)
        flow_run_id = (await ctx.fields(batch_id))["flow_run_id"]
        await send_command(ctx.settings, "stop", ctx.pipeline_id, batch_id)
        await ctx.processed(2)
        fields = await ctx.fields(batch_id)
        assert (fields["state"], fields["outcome"]) == ("stop", "cancelled")
        async with prefect(ctx.settings) as client:
            run = await client.read_flow_run(uuid.UUID(flow_run_id))
            assert run.state is not None and run.state.type.value == "CANCELLED"
            # A replayed run and a second stop change nothing.
            await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
            await send_command(ctx.settings, "stop", ctx.pipeline_id, batch_id)
            await ctx.processed(4)
            runs = await flow_runs(client, batch_id)
        assert [str(r.id) for r in runs] == [flow_run_id]
        assert runs[0].state is not None and runs[0].state.type.value == "CANCELLED"
        assert (await ctx.fields(batch_id))["state"] == "stop"


async def test_stop_of_a_batch_that_never_ran_goes_straight_to_stop(ctx: Ctx) -> None:
    batch_id = await ctx.batch()
    async with running(ctx.consumer()):
        await send_command(ctx.settings, "stop", ctx.pipeline_id, batch_id)
        await ctx.processed(1)
        fields = await ctx.fields(batch_id)
        assert (fields["state"], fields["outcome"]) == ("stop", "cancelled")
        await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
        await ctx.processed(2)
    async with prefect(ctx.settings) as client:
        assert await flow_runs(client, batch_id) == []
    assert "flow_run_id" not in await ctx.fields(batch_id)
    assert ctx.deployer.calls == 0


async def test_delete_removes_the_flow_run_and_the_batch(ctx: Ctx) -> None:
    batch_id = await ctx.batch()
    store = store_for(ctx.redis, ctx.settings)
    async with running(ctx.consumer(cleanup_recheck_s=1.0)):
        await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
        await ctx.processed(1)
        assert await store.hide(ctx.pipeline_id, batch_id)  # what the API does first
        await send_command(ctx.settings, "delete", ctx.pipeline_id, batch_id)
        await ctx.processed(2)

        async def purged() -> bool:
            return await ctx.redis.exists(keys.batch(ctx.pipeline_id, batch_id),
                                          keys.batch_seen(ctx.pipeline_id, batch_id),
                                          CLEANUP_DUE, CLEANUP_SINCE) == 0
        await eventually(purged, timeout=20)
        async with prefect(ctx.settings) as client:
            assert await flow_runs(client, batch_id) == []
        # Delivered again, and a run after it: both find nothing to do.
        await send_command(ctx.settings, "delete", ctx.pipeline_id, batch_id)
        await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
        await ctx.processed(4)
        await eventually(purged, timeout=20)
    async with prefect(ctx.settings) as client:
        assert await flow_runs(client, batch_id) == []
    assert await ctx.redis.exists(keys.batch(ctx.pipeline_id, batch_id)) == 0


async def test_malformed_commands_are_dead_lettered_and_the_loop_goes_on(ctx: Ctx) -> None:
    batch_id = await ctx.batch()
    async with running(ctx.consumer()):
        await send(ctx.settings, ctx.settings.topic_commands, batch_id, b"{not json")
        await send(ctx.settings, ctx.settings.topic_commands, batch_id,
                   orjson.dumps({"schema": 1, "type": "explode", "batch_id": batch_id}))
        await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
        await ctx.processed(3)
    assert (await ctx.fields(batch_id))["state"] == "scheduled"
    dead = await read_topic(ctx.settings, ctx.settings.topic_dlq, lambda r: len(r) >= 2)
    assert [r.value for r in dead] == [
        b"{not json", orjson.dumps({"schema": 1, "type": "explode", "batch_id": batch_id})]
    first = dict(dead[0].headers)
    assert first[dlq.REASON].startswith(b"malformed command: not JSON")
    topic, partition, offset = first[dlq.SOURCE].decode().rsplit(":", 2)
    assert (topic, offset) == (ctx.settings.topic_commands, "0") and partition.isdigit()
    assert first[dlq.CONSUMER] == b"commands"
    second = dict(dead[1].headers)[dlq.REASON]
    assert second.startswith(b"malformed command") and b"'explode'" in second
    assert dead[0].key == batch_id.encode()


async def test_a_command_nested_too_deep_is_dead_lettered_and_the_loop_goes_on(ctx: Ctx) -> None:
    """msgspec raises RecursionError on JSON nested 1,000 deep: left out of the codec's
    errors, it failed the partition's lane on that record at every delivery."""
    batch_id = await ctx.batch()
    bad = b'{"x":' + b"[" * 1000 + b"]" * 1000 + b"}"
    async with running(ctx.consumer()):
        await send(ctx.settings, ctx.settings.topic_commands, batch_id, bad)
        await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
        await ctx.processed(2)
    assert (await ctx.fields(batch_id))["state"] == "scheduled"
    [dead] = await read_topic(ctx.settings, ctx.settings.topic_dlq, lambda r: len(r) >= 1)
    assert dead.value == bad
    assert dict(dead.headers)[dlq.REASON].startswith(
        b"malformed command: invalid command: nested too deep")


async def test_a_malformed_command_too_large_to_dead_letter_is_sent_as_a_stub(
        ctx: Ctx) -> None:
    """A malformed command just under the producer's limit: its dead letter (the same value
    plus headers) is refused as too large; its stub goes instead and the lane goes on."""
    batch_id = await ctx.batch()
    bad = near_the_size_limit(batch_id, b'{"schema":1,"type":"explode","pad":"', b'"}')
    async with running(ctx.consumer()):
        await send(ctx.settings, ctx.settings.topic_commands, batch_id, bad)
        await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
        await ctx.processed(2)
    assert (await ctx.fields(batch_id))["state"] == "scheduled"
    [dead] = await read_topic(ctx.settings, ctx.settings.topic_dlq, lambda r: len(r) >= 1)
    assert (dead.key, dead.value) == (batch_id.encode(), b"")
    headers = dict(dead.headers)
    assert headers[dlq.REASON].startswith(b"malformed command") and b"'explode'" in headers[
        dlq.REASON]
    assert headers[dlq.CONSUMER] == b"commands"
    assert (headers[dlq.OMITTED], headers[dlq.VALUE_SIZE]) == (b"value", str(len(bad)).encode())


async def test_unknown_pipeline_version_fails_the_batch(ctx: Ctx) -> None:
    await ctx.batch()  # registers version 1
    spec = make_spec(ctx.pipeline_id, version="9")  # never registered
    batch_id = "batch-unknown-version"
    ctx.batches.append(batch_id)
    await store_for(ctx.redis, ctx.settings).create(ctx.pipeline_id, batch_id, spec)
    async with running(ctx.consumer()):
        command = await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id, "9")
        await ctx.processed(1)
    fields = await ctx.fields(batch_id)
    assert (fields["state"], fields["outcome"]) == ("stop", "failed")
    assert "unknown pipeline version" in fields["reason"]
    [dead] = await read_topic(ctx.settings, ctx.settings.topic_dlq, lambda r: len(r) >= 1)
    assert dead.value == command.encode()
    assert b"unknown pipeline version" in dict(dead.headers)[dlq.REASON]


async def test_deployment_missing_after_ensure_fails_the_batch(ctx: Ctx) -> None:
    batch_id = await ctx.batch()

    async def ensure_nothing(spec: Any, settings: Settings) -> uuid.UUID:
        ctx.deployer.calls += 1
        return uuid.uuid4()  # Prefect answers 404 for it

    consumer = CommandsConsumer(ctx.settings, options(), ensure=ensure_nothing)
    async with running(consumer):
        command = await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
        await ctx.processed(1)
    assert ctx.deployer.calls == 2  # ensured again once before giving up
    fields = await ctx.fields(batch_id)
    assert (fields["state"], fields["outcome"]) == ("stop", "failed")
    assert "missing after ensure" in fields["reason"]
    [dead] = await read_topic(ctx.settings, ctx.settings.topic_dlq, lambda r: len(r) >= 1)
    assert dead.value == command.encode()


async def test_prefect_unreachable_keeps_the_command_until_it_is_back(ctx: Ctx) -> None:
    batch_id = await ctx.batch()
    down = ctx.settings.model_copy(update={"prefect_api_url": "http://127.0.0.1:9/api"})
    consumer = ctx.consumer(down)
    async with running(consumer):
        await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
        await eventually(lambda: consumer.retries >= 3, timeout=20)
    # Shut down mid-retry: nothing committed, nothing applied, nothing dead-lettered.
    s = ctx.settings
    assert await committed(s, s.group_commands, s.topic_commands) == 0
    assert (await ctx.fields(batch_id))["state"] == "pending"
    async with running(ctx.consumer()):
        await ctx.processed(1)
    assert (await ctx.fields(batch_id))["state"] == "scheduled"
    async with prefect(ctx.settings) as client:
        assert len(await flow_runs(client, batch_id)) == 1


async def test_deploy_creates_the_deployment_and_an_unknown_version_is_dead_lettered(ctx: Ctx) -> None:
    await ctx.batch()  # registers version 1 of the test's pipeline, as PUT /pipelines does
    async with running(ctx.consumer()):
        await send_command(ctx.settings, "deploy", ctx.pipeline_id, "")
        await send_command(ctx.settings, "deploy", ctx.pipeline_id, "", version="9")
        await ctx.processed(2)
    assert ctx.deployer.calls == 1
    async with prefect(ctx.settings) as client:
        deployment = await client.read_deployment_by_name(f"run-pipeline/{ctx.pipeline_id}")
    assert deployment.id == ctx.deployer.ids[0]
    [dead] = await read_topic(ctx.settings, ctx.settings.topic_dlq, lambda r: len(r) >= 1)
    headers = dict(dead.headers)
    assert headers[dlq.REASON].startswith(b"deploy failed: unknown pipeline version")
    assert dead.key == ctx.pipeline_id.encode()
