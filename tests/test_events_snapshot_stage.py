"""The events consumer's snapshots sit between a poll's effect and its commit, on the real
Kafka and Redis: while a poll's snapshots are held (Kafka slow to acknowledge them) nothing is
committed, yet the next polls are applied and visible meanwhile; once they are acknowledged
the polls commit, the ones that waited covered by one flush that snapshots their batch once,
and the snapshot holds the batch's latest state."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from redis.asyncio import Redis

from consumers.events import EventsConsumer
from consumers.plumbing.snapshot_batch import SnapshotBatches
from core import keys
from core.codec import Event
from core.connections import open_producer
from core.settings import Settings
from core.snapshots import Snapshot, snapshot_key
from tests.conftest import eventually
from tests.helpers import read_topic
from tests.test_consumers_support import (
    committed,
    make_spec,
    new_batch,
    options,
    running,
    unique,
)


async def test_a_polls_commit_waits_for_its_snapshots_later_polls_do_not_and_share_a_flush(
        topics: Settings, redis: Redis) -> None:
    pipeline_id = unique("test-stage")
    batch_id = await new_batch(redis, topics, pipeline_id, make_spec(pipeline_id))
    gate = asyncio.Event()
    held: list[list[tuple[str, str]]] = []

    async def offset(n: int) -> bool:
        value = await redis.hget(keys.batch(pipeline_id, batch_id), "off:extract:partition_0")
        return value == str(n)

    async def send(n: int) -> None:
        await producer.send_and_wait(topics.topic_events, Event(
            type="step.offsets", batch_id=batch_id, pipeline_id=pipeline_id,
            step="extract", offsets={"partition_0": n}).encode(), key=batch_id.encode())

    consumer = EventsConsumer(topics, options())
    producer = await open_producer(topics)
    try:
        async with running(consumer):
            assert isinstance(consumer.snapshots, SnapshotBatches)
            write = consumer.snapshots.write_current

            async def slow_kafka(batches: Sequence[tuple[str, str]]) -> int:
                held.append(list(batches))
                await gate.wait()
                return await write(batches)

            consumer.snapshots.write_current = slow_kafka  # type: ignore[method-assign]
            await send(1)
            await eventually(lambda: offset(1), timeout=20)
            await eventually(lambda: _true(bool(held)), timeout=20)  # its flush is held
            # Later polls are applied and visible while the first poll's snapshots are held
            # (each sent once the one before shows: one poll each)...
            for n in (2, 3, 4, 5):
                await send(n)
                await eventually(lambda n=n: offset(n), timeout=20)
            assert held == [[(pipeline_id, batch_id)]]
            # ... and none is committed before its snapshots are acknowledged.
            assert await committed(topics, topics.group_events, topics.topic_events) == 0
            gate.set()

            async def all_committed() -> bool:
                return await committed(topics, topics.group_events, topics.topic_events) == 5
            await eventually(all_committed, timeout=20)
            # The four polls that waited are covered by one flush, their batch once in it.
            assert held == [[(pipeline_id, batch_id)]] * 2
    finally:
        await producer.stop()
    key = snapshot_key(pipeline_id, batch_id)
    records = await read_topic(topics, topics.topic_snapshots,
                               lambda rs: sum(r.key == key for r in rs) >= 2)
    last = Snapshot.decode([r for r in records if r.key == key][-1].value)
    assert last.fields["off:extract:partition_0"] == "5"


async def _true(value: bool) -> bool:
    return value
