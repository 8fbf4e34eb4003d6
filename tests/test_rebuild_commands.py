"""A rebuild of Redis takes from the commands topic what Redis alone held: a stop's pending
follow-up, the published ids deleted or removed by the retention, the order of a delete
against the creation it may follow, and the Idempotency-Keys an abandoned batch released
(`consumers.rebuild_commands`). On the real Kafka, Redis and Prefect (an idle work pool:
flow runs stay Scheduled)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any, cast
from uuid import UUID

import orjson
import pytest
from aiohttp.test_utils import TestClient
from prefect.states import Pending
from redis.asyncio import Redis

from consumers.events import EventsConsumer
from consumers.plumbing.scope import serving
from consumers.rebuild import rebuild
from consumers.rebuild_commands import CommandsRead
from core import keys
from core.codec import Command, decode_command
from core.command_messages import Recorded
from core.settings import Settings
from core.snapshots import pipeline_key, pipeline_record
from tests.conftest import eventually
from tests.helpers import AUTH, api_client, api_settings, read_topic, spec_body, swept_at
from tests.test_commands_published import Ctx, spec
from tests.test_consumers_support import (
    Deployer,
    committed,
    flow_runs,
    prefect,
    running,
    send,
    unique,
)
from tests.test_rebuild import _end
from tests.write_faults_proxy import KafkaProxy


@pytest.fixture
async def ctx(topics: Settings, redis: Redis) -> AsyncIterator[Ctx]:
    """A pipeline registered as the API registers it: in Redis and on the pipelines topic
    (what a rebuild reads)."""
    context = Ctx(topics, redis, Deployer(topics), unique("test-dur"))
    await context.register()
    await send(topics, topics.topic_pipelines,
               pipeline_key(context.pipeline_id, "1").decode(),
               pipeline_record(context.pipeline_id, spec(context.pipeline_id, "1"), 0))
    try:
        yield context
    finally:
        await context.deployer.cleanup(context.batches)


async def _get(settings: Settings, pipeline_id: str, batch_id: str) -> tuple[int, Any]:
    async with api_client(api_settings(settings)) as api:  # a fresh process: nothing cached
        resp = await api.get(f"/api/v1/batches/{pipeline_id}/{batch_id}", headers=AUTH)
        body = await resp.json()
    if isinstance(body, dict):
        body.pop("updated_at", None)
        body.pop("request_id", None)
    return resp.status, body


async def test_a_stop_whose_flow_run_was_pending_is_still_carried_out_after_a_rebuild(
        ctx: Ctx) -> None:
    """A stop that finds the flow run Pending (a worker is starting it) leaves a `stop` job in
    the clean-up queue, which cancels the run once it is past `stop_pending_wait_s`; the stop
    command is committed at once. The queue lives in Redis, and a rebuild requeues only the
    `delete` jobs: the accepted stop is lost, the run is never cancelled and the batch runs
    on to its end as if nobody had stopped it."""
    batch_id = ctx.new_id()
    key = keys.batch(ctx.pipeline_id, batch_id)
    commands = ctx.consumer(stop_pending_wait_s=600.0)
    events = EventsConsumer(ctx.settings, commands.options)
    async with serving([commands, events], ctx.settings, 5.0):
        await ctx.publish("run", batch_id, create={})
        await ctx.all_processed()

        async def scheduled() -> bool:
            return await ctx.redis.hget(key, "state") == "scheduled"
        await eventually(scheduled, timeout=30, interval=0.1)
        flow_run_id = UUID(cast(str, await ctx.redis.hget(key, "flow_run_id")))
        async with prefect(ctx.settings) as client:  # a worker claimed it: Pending
            await client.set_flow_run_state(flow_run_id, Pending(), force=True)
        await ctx.publish("stop", batch_id)  # the user's stop, answered 200 by the API
        await ctx.all_processed()
        assert await ctx.redis.zrange(keys.CLEANUP_DUE, 0, -1) == [f"stop/{ctx.pipeline_id}/"
                                                                   f"{batch_id}"]

        async def settled() -> bool:
            s = ctx.settings
            return await committed(s, s.group_events, s.topic_events) >= await _end(
                s, s.topic_events)
        await eventually(settled, timeout=30, interval=0.2)

    await ctx.redis.flushdb()
    await rebuild(ctx.settings)
    async with running(ctx.consumer(stop_pending_wait_s=0.5, cleanup_poll_s=0.2)):
        async def cancelled() -> bool:
            async with prefect(ctx.settings) as client:
                run = await client.read_flow_run(flow_run_id)
            return run.state_type is not None and run.state_type.value in (
                "CANCELLING", "CANCELLED")
        try:
            await eventually(cancelled, timeout=15, interval=0.5)
        except AssertionError:
            queued = await ctx.redis.zrange(keys.CLEANUP_DUE, 0, -1)
            raise AssertionError(f"after the rebuild the stop is never carried out: the flow "
                                 f"run stays Pending, clean-up jobs {queued}") from None



async def test_a_published_batch_removed_by_retention_stays_removed_after_a_rebuild(
        ctx: Ctx) -> None:
    """Retention marks the published id's claim deleted so a publisher's retry leaves the batch
    removed (c7a92e5). A rebuild restores the claims of deleted ids only from the delete
    commands on the topic; retention writes none, so the claim is lost and the same retry
    creates the batch again as new and runs it a second time."""
    batch_id = ctx.new_id()
    key = keys.batch(ctx.pipeline_id, batch_id)
    async with running(ctx.consumer()):
        await ctx.publish("run", batch_id, create={})
        await ctx.publish("stop", batch_id)
        await ctx.all_processed()
        assert await ctx.redis.hget(key, "state") == "stop"
    retention = ctx.settings.model_copy(update={"batch_retention_days": 30})
    assert await swept_at(retention, lambda: time.time() + 31 * 86_400) >= 1
    assert not await ctx.redis.exists(key)
    claim = cast(str | None, await ctx.redis.get(keys.published(batch_id)))
    assert claim is not None and orjson.loads(claim)["deleted"] is True

    # Redis is lost and rebuilt from Kafka (the stack's consumers stopped meanwhile).
    await ctx.redis.flushdb()
    await rebuild(ctx.settings)
    assert not await ctx.redis.exists(key)
    # The publisher's retry, as before the loss: it must leave the batch removed.
    async with running(ctx.consumer()):
        await ctx.publish("run", batch_id, create={})
        await ctx.all_processed()
    status, _ = await _get(ctx.settings, ctx.pipeline_id, batch_id)
    async with prefect(ctx.settings) as client:
        runs = await flow_runs(client, batch_id)
    assert (status, len(runs)) == (404, 1), (
        f"removed by retention, yet after a rebuild the retry made it again: GET {status}, "
        f"{len(runs)} flow runs")



async def test_a_published_delete_of_an_unknown_id_does_not_delete_the_batch_created_later(
        ctx: Ctx) -> None:
    """README: a published delete of a batch that does not exist does nothing. Here the id is
    then created by its run command (the same publisher, say, after its first run was
    dead-lettered) and runs; a rebuild hides it again from that earlier delete (the commands
    topic's deletes are a set, with no order against the creation) and queues its purge."""
    batch_id = ctx.new_id()
    commands = ctx.consumer(cleanup_recheck_s=0.5)
    events = EventsConsumer(ctx.settings, commands.options)
    async with serving([commands, events], ctx.settings, 5.0):
        await ctx.publish("delete", batch_id)  # of no batch: nothing to do
        await ctx.all_processed()
        await ctx.no_cleanup_left()
        await ctx.publish("run", batch_id, create={})
        await ctx.all_processed()

        async def scheduled() -> bool:
            status, body = await _get(ctx.settings, ctx.pipeline_id, batch_id)
            return status == 200 and body["state"]["state"] == "scheduled"
        await eventually(scheduled, timeout=30, interval=0.2)
        # Every event applied and snapshotted, every command committed.

        async def settled() -> bool:
            s = ctx.settings
            ends = await _end(s, s.topic_events)
            return await committed(s, s.group_events, s.topic_events) >= ends
        await eventually(settled, timeout=30, interval=0.2)
    before = await _get(ctx.settings, ctx.pipeline_id, batch_id)
    assert before[0] == 200

    await ctx.redis.flushdb()
    await rebuild(ctx.settings)
    after = await _get(ctx.settings, ctx.pipeline_id, batch_id)
    queued = await ctx.redis.zrange(keys.CLEANUP_DUE, 0, -1)
    assert (after, queued) == (before, []), (
        f"before the loss GET {before[0]}; after the rebuild GET {after[0]} and clean-up "
        f"jobs {queued}")



async def test_an_idempotency_key_released_after_an_ambiguous_send_stays_free_after_a_rebuild(
        topics: Settings, redis: Redis) -> None:
    """A POST whose run command Kafka wrote but did not confirm answers 503, abandons its batch
    and releases its Idempotency-Key, so the client's retry with the same key makes the batch.
    The run command carries the key's record as `committed` all the same, and a rebuild
    restores it: the retry then answers 409 (the key's batch was deleted) instead of a batch."""
    idem = {**AUTH, "Idempotency-Key": unique("key")}
    async with _api_behind_a_proxy(topics) as (proxy, api):
        proxy.mute()  # the broker writes the run command; its answer is lost
        resp = await api.post("/api/v1/batches/p", headers=idem)
        assert resp.status == 503
        proxy.restore()

        def kinds(records: list[Any]) -> list[str]:
            return [decode_command(r.value).type for r in records]
        # The abandoned batch's delete is queued behind its run command.
        await read_topic(topics, topics.topic_commands,
                         lambda rs: kinds(rs).count("delete") == 1, timeout=30)
    # Before the loss the key is free: the client's retry would make its batch (200).
    assert not await redis.keys("*idem*")
    await redis.flushdb()
    await rebuild(topics)
    assert await _retry(topics, idem) == 200, "the retry after the 503 made no batch"


async def test_a_delete_whose_send_went_unanswered_keeps_the_posts_key_after_a_rebuild(
        topics: Settings, redis: Redis) -> None:
    """A DELETE whose command Kafka did not confirm hides the batch and queues its delete
    again from the outbox; the POST that made the batch released nothing, so after a rebuild
    a retry with its Idempotency-Key still answers 409 (the key's batch was deleted), as it
    did before, and does not make a second batch."""
    idem = {**AUTH, "Idempotency-Key": unique("key")}
    async with _api_behind_a_proxy(topics) as (proxy, api):
        resp = await api.post("/api/v1/batches/p", headers=idem)
        assert resp.status == 200
        batch_id = (await resp.json())["item"]
        proxy.mute()  # the broker writes the delete command; its answer is lost
        resp = await api.delete(f"/api/v1/batches/p/{batch_id}", headers=AUTH)
        assert resp.status == 200
        proxy.restore()

        # The outbox's delete goes once Kafka answers again.
        async def sent() -> bool:
            return await redis.zcard(keys.ABANDONED) == 0
        await eventually(sent, timeout=30, interval=0.2)
    before = await _retry(topics, idem)
    await redis.flushdb()
    await rebuild(topics)
    after = await _retry(topics, idem)
    assert (before, after) == (409, 409), (
        f"the POST's retry answered {before} before the loss, {after} after the rebuild")


@asynccontextmanager
async def _api_behind_a_proxy(topics: Settings) -> AsyncIterator[tuple[KafkaProxy, TestClient[Any, Any]]]:
    """An API whose Kafka connections pass a proxy that can lose the broker's answers, with
    pipeline `p` registered."""
    proxy = KafkaProxy(topics.kafka_bootstrap.split(",")[0])
    await proxy.start()
    try:
        async with api_client(api_settings(topics, kafka_bootstrap=proxy.address)) as api:
            resp = await api.put("/api/v1/pipelines/p", json=spec_body(), headers=AUTH)
            assert resp.status == 201
            yield proxy, api
    finally:
        await proxy.close()


async def _retry(settings: Settings, headers: dict[str, str]) -> int:
    async with api_client(api_settings(settings)) as api:
        resp = await api.post("/api/v1/batches/p", headers=headers)
        return resp.status


def test_a_delete_or_stop_counts_only_after_the_batchs_last_creation() -> None:
    """Same key, same partition: offsets order a batch's commands; across partitions (the
    topic repartitioned since) the senders' times do."""
    read = CommandsRead()

    def take(kind: str, batch_id: str, partition: int, offset: int, ts: float,
             **fields: Any) -> None:
        value = Command(kind, batch_id, "p", ts=ts, **fields).encode()
        read.take(cast(Any, SimpleNamespace(partition=partition, offset=offset, value=value)))

    take("delete", "batch-a", 0, 1, 100.0)  # of no batch yet: nothing to do
    take("run", "batch-a", 0, 2, 101.0, create={})
    take("run", "batch-b", 1, 1, 100.0, create={})
    take("stop", "batch-b", 1, 2, 101.0)
    take("delete", "batch-b", 1, 3, 102.0, abandoned=True)
    take("delete", "batch-c", 0, 5, 50.0)  # its creation left the topic: earlier
    take("run", "batch-d", 2, 9, 100.0, create={})
    take("stop", "batch-d", 0, 1, 99.0)  # another partition, an earlier time
    take("run", "batch-e", 1, 4, 100.0)  # a plain run creates nothing
    take("stop", "batch-e", 1, 3, 99.0)
    assert read.deletes == {("p", "batch-b"), ("p", "batch-c")}
    assert read.stops == {("p", "batch-b"), ("p", "batch-e")}
    assert read.published == {("p", "batch-a"), ("p", "batch-b"), ("p", "batch-d")}
    assert read.abandoned == {("p", "batch-b")}


def test_an_api_runs_delete_counts_wherever_it_is_on_the_topic() -> None:
    """A DELETE sent while the POST's send was slow reaches the topic before the run: live,
    the consumer hides the batch and then skips its run. The run counted as a creation, so
    a rebuild restored the batch live from what its run recorded, and ran it."""
    read = CommandsRead()
    recorded = Recorded(seq=1, created_at="2026-12-05T00:00:00.000Z", extra={})
    for kind, batch_id, offset in (("delete", "batch-x", 1), ("run", "batch-x", 2),
                                   ("stop", "batch-y", 3), ("run", "batch-y", 4)):
        fields: dict[str, Any] = {"recorded": recorded} if kind == "run" else {}
        value = Command(kind, batch_id, "p", ts=100.0 + offset, **fields).encode()
        read.take(cast(Any, SimpleNamespace(partition=0, offset=offset, value=value)))
    assert read.deletes == {("p", "batch-x")}
    assert read.stops == {("p", "batch-y")}
    assert set(read.recorded) == {("p", "batch-x"), ("p", "batch-y")}
