"""A revoke whose flush is slow must end before the broker gives the partitions away. With
aiokafka's default rebalance timeout (the session timeout, 10 s) below the revoke's wait
(`revoke_wait_s`, 20 s), the broker completed the rebalance without A while A's listener
still handed its work over: B took every partition and committed past event 2, and A's held
snapshot of event 1, admitted since A's epoch was not raised yet, landed after B's, so the
compacted topic kept the older one for a rebuild. The consumers now ask for a rebalance
timeout longer than the wait and its fencing (`consumers.plumbing.kafka.open_consumer`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aiokafka import TopicPartition
from redis.asyncio import Redis

from consumers.events import EventsConsumer
from core.settings import Settings
from tests.conftest import eventually
from tests.test_consumers_support import options, running
from tests.test_events_rebalance import Group, committed_at, group_of

pytestmark = pytest.mark.timeout(170)


@pytest.fixture
async def group(topics: Settings, redis: Redis) -> AsyncIterator[Group]:
    # The production default of revoke_wait_s (ConsumerOptions: 20 s).
    async with group_of(topics, redis, revoke_wait_s=20.0) as setup:
        yield setup


async def test_a_slow_revoke_ends_before_the_new_owner_writes_over_it(
        group: Group) -> None:
    first = group.first
    second = EventsConsumer(group.settings, options(revoke_wait_s=20.0))
    async with running(first):
        revoke_started: list[float] = []
        handover = first.stages.on_partitions_revoked

        async def on_revoked(revoked: list[TopicPartition]) -> None:
            if revoked:
                revoke_started.append(time.monotonic())
            await handover(revoked)

        first.stages.on_partitions_revoked = on_revoked  # type: ignore[method-assign]
        await group.flush_held()  # A's flush of event 1 read its records; the send waits
        try:
            async with running(second):
                await eventually(lambda: bool(revoke_started), timeout=20)

                def b_owns_one() -> bool:
                    assert second._consumer is not None
                    return bool(second._consumer.assignment())
                # B's share, once the rebalance is over: only after A's revoke now (before, the
                # broker completed it without A, 10 s in).
                await eventually(b_owns_one, timeout=60)
                assert second._consumer is not None
                tp = min(second._consumer.assignment())
                batch_id = group.by_partition[tp.partition]
                await group.send(batch_id, 2)
                await eventually(lambda: group.offset_is(batch_id, 2), timeout=20)

                async def b_committed_2() -> bool:
                    return await committed_at(group.settings, tp) == 2
                await eventually(b_committed_2, timeout=20, interval=0.05)
                # Only once A's revoke is over: its wait ran out and its work was fenced.
                assert first.stages.epoch > 0
                group.gate.set()  # A's flush, still inside its revoke wait, goes on
                await asyncio.wait_for(group.released.wait(), 20)
                assert await committed_at(group.settings, tp) == 2
                snap = await group.last_snapshot(batch_id)
                # The last snapshot on the compacted topic must hold event 2, which the group
                # has committed past (a rebuild from it would lose event 2 otherwise).
                assert snap.fields["off:extract:partition_0"] == "2"
        finally:
            group.gate.set()  # a failure must not leave A's flush held (its stop waits)
