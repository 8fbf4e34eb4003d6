"""The events consumer's snapshots sit between a poll's effect and its commit, on the real
Kafka and Redis: while a poll's snapshots are held (Kafka slow to acknowledge them) nothing is
committed, yet the next poll is applied and visible meanwhile; once they are acknowledged both
polls commit and the snapshot holds the batch's latest state."""

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


async def test_a_polls_commit_waits_for_its_snapshots_and_the_next_poll_does_not(
        topics: Settings, redis: Redis) -> None:
    pipeline_id = unique("test-stage")
    batch_id = await new_batch(redis, topics, pipeline_id, make_spec(pipeline_id))
    gate = asyncio.Event()
    held: list[list[tuple[str, str]]] = []

    async def offset(n: int) -> bool:
        value = await redis.hget(keys.batch(pipeline_id, batch_id), "off:extract:partition_0")
        return value == str(n)

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
            for n in (1, 2):  # two polls: the second sent once the first is applied
                await producer.send_and_wait(topics.topic_events, Event(
                    type="step.offsets", batch_id=batch_id, pipeline_id=pipeline_id,
                    step="extract", offsets={"partition_0": n}).encode(),
                    key=batch_id.encode())
                await eventually(lambda n=n: offset(n), timeout=20)
            # The second poll was applied while the first's snapshots were held...
            assert held == [[(pipeline_id, batch_id)]]
            # ... and neither is committed before its snapshots are acknowledged.
            assert await committed(topics, topics.group_events, topics.topic_events) == 0
            gate.set()

            async def both_committed() -> bool:
                return await committed(topics, topics.group_events, topics.topic_events) == 2
            await eventually(both_committed, timeout=20)
            assert len(held) == 2
    finally:
        await producer.stop()
    key = snapshot_key(pipeline_id, batch_id)
    records = await read_topic(topics, topics.topic_snapshots,
                               lambda rs: sum(r.key == key for r in rs) >= 2)
    last = Snapshot.decode([r for r in records if r.key == key][-1].value)
    assert last.fields["off:extract:partition_0"] == "2"
