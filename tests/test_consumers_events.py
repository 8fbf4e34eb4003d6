"""The events consumer on the real Kafka and Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, cast

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from redis.asyncio import Redis

from consumers.events import EventsConsumer
from consumers.plumbing import dlq
from core import keys
from core.applier import script_entries
from core.codec import Event
from core.connections import open_producer
from core.models import iso_of
from core.packing import unpacked
from core.settings import Settings
from tests.conftest import eventually
from tests.helpers import read_topic
from tests.test_consumers_support import (
    committed,
    make_spec,
    near_the_size_limit,
    new_batch,
    options,
    running,
    send,
    store_for,
    unique,
)

# Prefect's flow run ids are UUIDs (the codec refuses anything else).
RUN_ID = "0b5c3a8e-6f1d-4c2a-9e57-3d1f2a4b5c6d"


@dataclass
class Ctx:
    settings: Settings
    redis: Redis
    pipeline_id: str

    async def batch(self) -> str:
        return await new_batch(self.redis, self.settings, self.pipeline_id,
                               make_spec(self.pipeline_id))

    def event(self, batch_id: str, kind: str, **fields: Any) -> Event:
        return Event(type=kind, batch_id=batch_id, pipeline_id=self.pipeline_id, **fields)

    async def publish(self, *events: Event) -> None:
        producer = await open_producer(self.settings)
        try:
            for e in events:
                await producer.send_and_wait(self.settings.topic_events, value=e.encode(),
                                             key=e.batch_id.encode())
        finally:
            await producer.stop()

    async def fields(self, batch_id: str) -> dict[str, str]:
        return unpacked(cast(dict[str, str],
                             await self.redis.hgetall(keys.batch(self.pipeline_id, batch_id))))

    async def processed(self, count: int) -> None:
        async def done() -> bool:
            s = self.settings
            return await committed(s, s.group_events, s.topic_events) >= count
        await eventually(done, timeout=20)


@pytest.fixture
async def ctx(topics: Settings, redis: Redis) -> AsyncIterator[Ctx]:
    yield Ctx(topics, redis, unique("test-ev"))


async def test_events_are_applied(ctx: Ctx) -> None:
    batch_id = await ctx.batch()
    async with running(EventsConsumer(ctx.settings, options())):
        await ctx.publish(
            ctx.event(batch_id, "batch.state", state="scheduled", flow_run_id=RUN_ID),
            ctx.event(batch_id, "batch.state", state="running"),
            ctx.event(batch_id, "step.state", step="extract", state="running"),
            ctx.event(batch_id, "step.offsets", step="extract",
                      offsets={"partition_0": 10, "partition_1": 5}),
            ctx.event(batch_id, "step.state", step="extract", state="success"),
        )
        await ctx.processed(5)
    batch = await store_for(ctx.redis, ctx.settings).get(ctx.pipeline_id, batch_id)
    assert batch is not None
    assert batch["state"]["state"] == "running"
    assert batch["flow_run_id"] == RUN_ID
    steps = batch["state"]["steps"]
    # No totals reported: no percent nor ETA (the rate depends on the clock).
    assert steps["extract"].pop("progress")["percent"] is None
    assert steps["transform"].pop("progress") == {
        "percent": None, "records_per_s": None, "eta_s": None}
    assert steps["extract"] == {
        "state": "success", "offsets": {"partition_0": 10, "partition_1": 5}}
    assert steps["transform"] == {"state": "none", "offsets": {}}


async def test_duplicates_and_older_offsets_change_nothing(ctx: Ctx) -> None:
    batch_id = await ctx.batch()
    offsets = ctx.event(batch_id, "step.offsets", step="load", offsets={"partition_0": 100})
    stop = ctx.event(batch_id, "batch.state", state="stop", outcome="completed")
    consumer = EventsConsumer(ctx.settings, options())
    async with running(consumer):
        await ctx.publish(offsets, stop)
        await ctx.processed(2)
        before = await ctx.fields(batch_id)
        await ctx.publish(
            offsets, stop,  # the same events again
            ctx.event(batch_id, "step.offsets", step="load", offsets={"partition_0": 50}),
            ctx.event(batch_id, "batch.state", state="running"),  # backwards
            # an older stop changes nothing (the latest stop decides the outcome)
            ctx.event(batch_id, "batch.state", state="stop", outcome="failed", ts=stop.ts - 1),
        )
        await ctx.processed(7)
    after = await ctx.fields(batch_id)
    assert after == before
    # A stopped batch keeps no de-duplication state: its later events are harmless by value.
    assert "seen_n" not in after
    assert not await ctx.redis.exists(keys.batch_seen(ctx.pipeline_id, batch_id))
    assert (before["state"], before["outcome"], before["off:load:partition_0"]) == (
        "stop", "completed", "100")
    assert consumer.applied == 7


async def test_malformed_events_are_dead_lettered_and_the_loop_goes_on(ctx: Ctx) -> None:
    batch_id = await ctx.batch()
    bad = [
        b"\xff\xfe not json",
        orjson.dumps({"schema": 1, "type": "batch.exploded", "event_id": "e1",
                      "batch_id": batch_id, "pipeline_id": ctx.pipeline_id, "ts": 1.0}),
        orjson.dumps({"schema": 1, "type": "step.offsets", "event_id": "e2", "step": "load",
                      "batch_id": batch_id, "pipeline_id": ctx.pipeline_id, "ts": 1.0,
                      "offsets": {"partition_0": -1}}),
    ]
    consumer = EventsConsumer(ctx.settings, options())
    async with running(consumer):
        for value in bad:
            await send(ctx.settings, ctx.settings.topic_events, batch_id, value)
        await ctx.publish(ctx.event(batch_id, "batch.state", state="running"))
        await ctx.processed(4)
    assert (await ctx.fields(batch_id))["state"] == "running"
    dead = await read_topic(ctx.settings, ctx.settings.topic_dlq, lambda r: len(r) >= 3)
    assert [r.value for r in dead] == bad
    reasons = [dict(r.headers)[dlq.REASON].decode() for r in dead]
    assert reasons[0].startswith("not JSON")
    # The codec's own wording; what matters here is that the reason names the fault.
    assert reasons[1].startswith("invalid event") and "batch.exploded" in reasons[1]
    assert reasons[2].startswith("invalid event") and "offsets" in reasons[2]
    assert all(dict(r.headers)[dlq.CONSUMER] == b"events" for r in dead)
    assert consumer.dead == 3


async def test_a_record_nested_too_deep_is_dead_lettered_and_the_loop_goes_on(ctx: Ctx) -> None:
    """2 KB of JSON nested 1,000 deep makes msgspec raise RecursionError: left out of the
    codec's errors, it ended the loop, and every restart met the same record first."""
    batch_id = await ctx.batch()
    bad = b'{"x":' + b"[" * 1000 + b"]" * 1000 + b"}"
    consumer = EventsConsumer(ctx.settings, options())
    async with running(consumer):
        await send(ctx.settings, ctx.settings.topic_events, batch_id, bad)
        await ctx.publish(ctx.event(batch_id, "batch.state", state="running"))
        await ctx.processed(2)
    assert (await ctx.fields(batch_id))["state"] == "running"
    [dead] = await read_topic(ctx.settings, ctx.settings.topic_dlq, lambda r: len(r) >= 1)
    assert dead.value == bad
    assert dict(dead.headers)[dlq.REASON].startswith(b"invalid event: nested too deep")
    assert consumer.dead == 1


async def test_a_malformed_record_too_large_to_dead_letter_is_sent_as_a_stub(ctx: Ctx) -> None:
    """A malformed record the topic took, just under the producer's limit (a reason of 1 MB):
    its dead letter, the same value plus headers, is refused as too large. Raised (a
    permanent error), that ended the loop on the same record at every restart; its stub
    (the headers, no value) is dead-lettered instead and the partition moves on."""
    batch_id = await ctx.batch()
    head = orjson.dumps({"schema": 1, "type": "batch.state", "event_id": "e1",
                         "batch_id": batch_id, "pipeline_id": ctx.pipeline_id, "ts": 1.0,
                         "state": "stop", "outcome": "failed"})[:-1] + b',"reason":"'
    bad = near_the_size_limit(batch_id, head, b'"}')
    consumer = EventsConsumer(ctx.settings, options())
    async with running(consumer):
        await send(ctx.settings, ctx.settings.topic_events, batch_id, bad)
        await ctx.publish(ctx.event(batch_id, "batch.state", state="running"))
        await ctx.processed(2)
    assert (await ctx.fields(batch_id))["state"] == "running"
    [dead] = await read_topic(ctx.settings, ctx.settings.topic_dlq, lambda r: len(r) >= 1)
    assert (dead.key, dead.value) == (batch_id.encode(), b"")
    headers = dict(dead.headers)
    assert headers[dlq.REASON].startswith(b"invalid event") and b"reason" in headers[dlq.REASON]
    topic, _, offset = headers[dlq.SOURCE].decode().rsplit(":", 2)
    assert (topic, offset) == (ctx.settings.topic_events, "0")
    assert headers[dlq.CONSUMER] == b"events"
    assert (headers[dlq.OMITTED], headers[dlq.VALUE_SIZE]) == (b"value", str(len(bad)).encode())
    assert dlq.KEY_SIZE not in headers
    assert consumer.dead == 1 and consumer.dlq.stubs == 1
    assert consumer.dlq.sent == {"malformed": 1}


async def test_a_dead_letter_the_broker_refuses_as_too_large_is_sent_as_a_stub(
        ctx: Ctx) -> None:
    """The producer's limit is not the only one: a dead-letter topic whose max.message.bytes
    is below the record's size refuses the dead letter in the produce response (the send's
    future fails), which must end in a stub too, not in the loop's end."""
    settings = ctx.settings.model_copy(update={"topic_dlq": ctx.settings.topic_dlq + ".small"})
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(settings.topic_dlq, 1, 1,
                                            topic_configs={"max.message.bytes": "4096"})])
        batch_id = await ctx.batch()
        bad = b"{" + b" " * 10_000 + b"not json"
        good = ctx.event(batch_id, "batch.state", state="running")
        consumer = EventsConsumer(settings, options())
        async with running(consumer):
            await send(settings, settings.topic_events, batch_id, bad)
            await ctx.publish(good)
            await ctx.processed(2)
        assert (await ctx.fields(batch_id))["state"] == "running"
        [dead] = await read_topic(settings, settings.topic_dlq, lambda r: len(r) >= 1)
        headers = dict(dead.headers)
        assert dead.value == b"" and headers[dlq.REASON].startswith(b"not JSON")
        assert (headers[dlq.OMITTED], headers[dlq.VALUE_SIZE]) == (b"value", b"10009")
        assert consumer.dead == 1 and consumer.dlq.stubs == 1
    finally:
        try:
            await admin.delete_topics([settings.topic_dlq])
        finally:
            await admin.close()


def test_a_stub_leaves_out_a_key_too_large_too() -> None:
    """A key is an id on every topic read here; one over MAX_STUB_KEY would keep the stub
    itself too large, so it goes too, and its size is said."""
    record = SimpleNamespace(topic="t", partition=0, offset=7, key=b"k" * (dlq.MAX_STUB_KEY + 1),
                             value=b"v" * 10)
    key, headers = dlq.stub(record, dlq.headers(record, "why", "events"))
    found = dict(headers)
    assert key is None
    assert (found[dlq.OMITTED], found[dlq.VALUE_SIZE], found[dlq.KEY_SIZE]) == (
        b"key,value", b"10", str(dlq.MAX_STUB_KEY + 1).encode())
    assert (found[dlq.REASON], found[dlq.SOURCE]) == (b"why", b"t:0:7")
    record.key = b"k" * dlq.MAX_STUB_KEY
    key, headers = dlq.stub(record, [])
    assert key == record.key and dict(headers)[dlq.OMITTED] == b"value"
    assert dlq.KEY_SIZE not in dict(headers)


async def test_events_of_deleted_or_unknown_batches_are_dropped(ctx: Ctx) -> None:
    batch_id = await ctx.batch()
    store = store_for(ctx.redis, ctx.settings)
    assert await store.hide(ctx.pipeline_id, batch_id)
    before = await ctx.fields(batch_id)
    consumer = EventsConsumer(ctx.settings, options())
    async with running(consumer):
        await ctx.publish(
            ctx.event(batch_id, "batch.state", state="running"),
            ctx.event("batch-never-created", "batch.state", state="running"),
        )
        await ctx.processed(2)
    assert await ctx.fields(batch_id) == before
    assert not await ctx.redis.exists(keys.batch(ctx.pipeline_id, "batch-never-created"))
    assert consumer.dropped == 2


async def test_offsets_are_committed_after_the_write_and_a_restart_resumes_there(
        ctx: Ctx) -> None:
    batch_id = await ctx.batch()
    first = EventsConsumer(ctx.settings, options())
    async with running(first):
        await ctx.publish(*(ctx.event(batch_id, "step.offsets", step="extract",
                                      offsets={"partition_0": n}) for n in range(1, 31)))
        await ctx.processed(30)
    assert first.applied == 30
    assert (await ctx.fields(batch_id))["off:extract:partition_0"] == "30"
    # The same group again: only what came after the commit is read.
    second = EventsConsumer(ctx.settings, options())
    async with running(second):
        await ctx.publish(ctx.event(batch_id, "step.offsets", step="extract",
                                    offsets={"partition_0": 31}))
        await ctx.processed(31)
    assert second.applied == 1
    assert (await ctx.fields(batch_id))["off:extract:partition_0"] == "31"


async def test_many_batches_in_one_poll(ctx: Ctx) -> None:
    batch_ids = [await ctx.batch() for _ in range(20)]
    events = [ctx.event(b, "step.offsets", step="transform", offsets={"partition_0": n})
              for n in range(1, 101) for b in batch_ids]
    producer = await open_producer(ctx.settings, linger_ms=20)
    try:
        futures = [await producer.send(ctx.settings.topic_events, value=e.encode(),
                                       key=e.batch_id.encode()) for e in events]
        for future in futures:
            await future
    finally:
        await producer.stop()
    consumer = EventsConsumer(ctx.settings, options())
    async with running(consumer):
        await ctx.processed(len(events))
    assert consumer.applied == len(events)
    for batch_id in batch_ids:
        assert (await ctx.fields(batch_id))["off:transform:partition_0"] == "100"


def test_a_poll_merges_the_highest_offset_per_partition_and_keeps_every_other_event() -> None:
    """What `BatchStore.apply` sends for a poll (`script_entries`). The merged events' ids do
    not matter: offsets apply by value, never de-duplicated (tests/test_scripts.py shows a
    merged event carrying a re-sent id still lands)."""
    def ev(batch: str, kind: str, **fields: Any) -> Event:
        return Event(type=kind, batch_id=batch, pipeline_id="p", **fields)

    events = [
        ev("b1", "step.offsets", step="s", offsets={"p0": 5}, event_id="a"),
        ev("b1", "step.state", step="s", state="running", event_id="b"),
        ev("b1", "step.offsets", step="s", offsets={"p0": 3, "p1": 7}, event_id="c"),
        ev("b2", "step.offsets", step="s", offsets={"p0": 1}, event_id="d"),
        ev("b1", "step.offsets", step="t", offsets={"p0": 2}, event_id="e"),
        ev("b1", "batch.state", state="stop", outcome="failed", event_id="f"),
    ]
    given = [e.to_dict() for e in events]
    stop_ts = repr(events[-1].ts)
    assert script_entries(events) == {"p": {
        "b1": [["s", "b", "s", "running", iso_of(events[1].ts)],
               ["b", "f", "stop", "failed", None, None, stop_ts],
               ["o", "s", "p0", "5", "p1", "7"],
               ["o", "t", "p0", "2"]],
        "b2": [["o", "s", "p0", "1"]],
    }}
    assert [e.to_dict() for e in events] == given  # the poll's own events are left as read
