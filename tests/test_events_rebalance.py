"""Two events consumers of one group across a rebalance. The one that loses a partition
hands its work over first (its flush in flight and what is due, snapshotted and committed)
and, when that takes too long, sends nothing more for it: it must never overwrite its new
owner's snapshot with one it read before the revoke (compaction keeps the last: a rebuild
from it and the committed offset would lose an event)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
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
from tests.test_consumers_support import (
    group_offsets,
    make_spec,
    new_batch,
    options,
    running,
    unique,
)

pytestmark = pytest.mark.timeout(120)


async def committed_at(settings: Settings, tp: TopicPartition) -> int:
    return (await group_offsets(settings, settings.group_events)).get(tp, -1)


@dataclass
class Group:
    """One batch per events partition; consumer A, whose snapshot sends wait for `gate`."""

    settings: Settings
    redis: Redis
    producer: AIOKafkaProducer
    pipeline_id: str
    by_partition: dict[int, str]
    first: EventsConsumer
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)  # a held send went on
    held: list[Sequence[tuple[str, str]]] = field(default_factory=list)

    def hold_sends(self) -> None:
        send_records = self.first.snapshots._send

        async def slow_kafka(batches: Sequence[tuple[str, str]],
                             records: list[str | None]) -> int:
            self.held.append(batches)  # the records were read from Redis already
            await self.gate.wait()
            try:
                return await send_records(batches, records)
            finally:
                self.released.set()

        self.first.snapshots._send = slow_kafka  # type: ignore[method-assign]

    async def flush_held(self) -> None:
        """Event 1 of every batch applied by A, whose flush of them waits for `gate`."""
        self.hold_sends()
        for batch_id in self.by_partition.values():
            await self.send(batch_id, 1)
        await eventually(lambda: bool(self.held), timeout=20)

    async def moved_to(self, second: EventsConsumer) -> tuple[TopicPartition, str]:
        """Once `second` joined and took one partition from A: that partition, its batch."""
        await eventually(lambda: rebalanced(self.first, second), timeout=30)
        assert second._consumer is not None
        (moved_tp,) = second._consumer.assignment()
        return moved_tp, self.by_partition[moved_tp.partition]

    async def send(self, batch_id: str, n: int) -> None:
        await self.producer.send_and_wait(self.settings.topic_events, Event(
            type="step.offsets", batch_id=batch_id, pipeline_id=self.pipeline_id,
            step="extract", offsets={"partition_0": n}).encode(), key=batch_id.encode())

    async def offset_is(self, batch_id: str, n: int) -> bool:
        value = await self.redis.hget(keys.batch(self.pipeline_id, batch_id),
                                      "off:extract:partition_0")
        return value == str(n)

    async def last_snapshot(self, batch_id: str) -> Snapshot:
        key = snapshot_key(self.pipeline_id, batch_id)
        records = await read_topic(self.settings, self.settings.topic_snapshots,
                                   lambda rs: any(r.key == key for r in rs))
        return Snapshot.decode([r for r in records if r.key == key][-1].value)


@pytest.fixture
async def group(topics: Settings, redis: Redis) -> AsyncIterator[Group]:
    async with group_of(topics, redis, revoke_wait_s=2.0) as setup:
        yield setup


@contextlib.asynccontextmanager
async def group_of(topics: Settings, redis: Redis, *, revoke_wait_s: float
                   ) -> AsyncIterator[Group]:
    """One batch per events partition, and consumer A (not started) waiting `revoke_wait_s`
    at a revoke."""
    pipeline_id = unique("test-rebalance")
    spec = make_spec(pipeline_id)
    by_partition: dict[int, str] = {}
    while len(by_partition) < topics.events_partitions:
        batch_id = await new_batch(redis, topics, pipeline_id, spec)
        by_partition.setdefault(DefaultPartitioner()(batch_id.encode(), [0, 1], [0, 1]),
                                batch_id)
    producer = await open_producer(topics)
    first = EventsConsumer(topics, options(revoke_wait_s=revoke_wait_s))
    setup = Group(topics, redis, producer, pipeline_id, by_partition, first)
    try:
        yield setup
    finally:
        setup.gate.set()
        await producer.stop()


def rebalanced(first: EventsConsumer, second: EventsConsumer) -> bool:
    assert first._consumer is not None and second._consumer is not None
    return len(second._consumer.assignment()) == 1 and len(first._consumer.assignment()) == 1


async def test_a_revoke_hands_the_flush_in_flight_over_before_the_new_owner_starts(
        group: Group) -> None:
    """A's flush is held when B joins; it goes on during A's revoke: B then starts from
    A's commit and reads nothing again."""
    first, second = group.first, EventsConsumer(group.settings, options())
    async with running(first):
        handover = first.stages.on_partitions_revoked

        async def on_revoked(revoked: list[TopicPartition]) -> None:
            group.gate.set()  # Kafka acknowledges A's snapshots during its revoke
            await handover(revoked)

        first.stages.on_partitions_revoked = on_revoked  # type: ignore[method-assign]
        await group.flush_held()
        async with running(second):
            moved_tp, moved = await group.moved_to(second)
            assert await committed_at(group.settings, moved_tp) == 1  # before B started
            await group.send(moved, 2)
            await eventually(lambda: group.offset_is(moved, 2), timeout=20)
            # B's count is raised once the script has answered, a moment after Redis shows
            # the effect: read it once B has committed past event 2 (all it read counted).
            async def committed_past_event_2() -> bool:
                return await committed_at(group.settings, moved_tp) == 2
            await eventually(committed_past_event_2, timeout=20, interval=0.05)
            assert second.applied == 1  # the new event only: event 1 was A's, committed
    assert (await group.last_snapshot(moved)).fields["off:extract:partition_0"] == "2"


async def test_a_revoked_consumer_does_not_overwrite_the_new_owners_snapshot(
        group: Group) -> None:
    """A's flush is held past its revoke wait: B takes a partition, applies the second
    event there, snapshots and commits it. Then A's held send goes on: it must not land."""
    first, second = group.first, EventsConsumer(group.settings, options(revoke_wait_s=2.0))
    async with running(first):
        await group.flush_held()
        async with running(second):
            moved_tp, moved = await group.moved_to(second)
            await group.send(moved, 2)
            await eventually(lambda: group.offset_is(moved, 2), timeout=20)

            async def new_owner_committed() -> bool:
                return await committed_at(group.settings, moved_tp) == 2
            await eventually(new_owner_committed, timeout=30)
            group.gate.set()  # the revoked consumer's flush goes on
            await asyncio.wait_for(group.released.wait(), 20)  # sent, or not at all
    assert await committed_at(group.settings, moved_tp) == 2
    assert (await group.last_snapshot(moved)).fields["off:extract:partition_0"] == "2"
