"""Two events consumers of one group across a rebalance: the one that lost a partition must
not overwrite its new owner's snapshot with one it read before the revoke (compaction keeps
the last: a rebuild from it and the committed offset would lose an event)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner
from redis.asyncio import Redis

from consumers.events import EventsConsumer
from core import keys
from core.codec import Event
from core.connections import open_producer
from core.settings import Settings
from core.snapshots import Snapshot, snapshot_key
from tests.conftest import eventually
from tests.helpers import read_topic
from tests.test_consumers_support import make_spec, new_batch, options, running, unique

pytestmark = pytest.mark.timeout(120)


async def committed_at(settings: Settings, tp: TopicPartition) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(settings.group_events)
    finally:
        await admin.close()
    meta = offsets.get(tp)
    return int(meta.offset) if meta is not None else -1


async def test_a_revoked_consumer_does_not_overwrite_the_new_owners_snapshot(
        topics: Settings, redis: Redis) -> None:
    """A applies each batch's first event and its flush reads the snapshots, then its send
    is held. B joins and takes one partition, applies the second event there, snapshots and
    commits it. Then A's held send goes on: it must not land."""
    pipeline_id = unique("test-rebalance")
    spec = make_spec(pipeline_id)
    by_partition: dict[int, str] = {}
    while len(by_partition) < topics.events_partitions:
        batch_id = await new_batch(redis, topics, pipeline_id, spec)
        by_partition.setdefault(DefaultPartitioner()(batch_id.encode(), [0, 1], [0, 1]),
                                batch_id)

    async def offset_is(batch_id: str, n: int) -> bool:
        value = await redis.hget(keys.batch(pipeline_id, batch_id), "off:extract:partition_0")
        return value == str(n)

    producer = await open_producer(topics)

    async def send(batch_id: str, n: int) -> None:
        await producer.send_and_wait(topics.topic_events, Event(
            type="step.offsets", batch_id=batch_id, pipeline_id=pipeline_id,
            step="extract", offsets={"partition_0": n}).encode(), key=batch_id.encode())

    first = EventsConsumer(topics, options(revoke_wait_s=2.0))
    second = EventsConsumer(topics, options(revoke_wait_s=2.0))
    gate, released = asyncio.Event(), asyncio.Event()
    held: list[Sequence[tuple[str, str]]] = []
    try:
        async with running(first):
            send_records = first.snapshots._send

            async def slow_kafka(batches: Sequence[tuple[str, str]],
                                 records: list[str | None]) -> int:
                held.append(batches)  # the records were read from Redis already
                await gate.wait()
                try:
                    return await send_records(batches, records)
                finally:
                    released.set()

            first.snapshots._send = slow_kafka  # type: ignore[method-assign]
            for batch_id in by_partition.values():
                await send(batch_id, 1)
            await eventually(lambda: bool(held), timeout=20)
            async with running(second):
                def rebalanced() -> bool:
                    assert first._consumer is not None and second._consumer is not None
                    return (len(second._consumer.assignment()) == 1
                            and len(first._consumer.assignment()) == 1)
                await eventually(rebalanced, timeout=30)
                assert second._consumer is not None
                (moved_tp,) = second._consumer.assignment()
                moved = by_partition[moved_tp.partition]
                await send(moved, 2)
                await eventually(lambda: offset_is(moved, 2), timeout=20)

                async def new_owner_committed() -> bool:
                    return await committed_at(topics, moved_tp) == 2
                await eventually(new_owner_committed, timeout=30)
                gate.set()  # the revoked consumer's flush goes on
                await asyncio.wait_for(released.wait(), 20)  # sent, or not at all
                key = snapshot_key(pipeline_id, moved)
                records = await read_topic(topics, topics.topic_snapshots,
                                           lambda rs: any(r.key == key for r in rs))
    finally:
        gate.set()
        await producer.stop()
    last = Snapshot.decode([r for r in records if r.key == key][-1].value)
    assert await committed_at(topics, moved_tp) == 2
    assert last.fields["off:extract:partition_0"] == "2"
