"""The events consumer's stages on the real Kafka and Redis: a poll's commit runs beside the
next poll's apply (off the path to visible), commits lag the applies by one poll at most, and
none is made before its poll's effect."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from redis.asyncio import Redis

from consumers import events as events_module
from consumers.events import EventsConsumer
from consumers.plumbing.kafka import commit_retrying
from core import keys
from core.codec import Event
from core.retry import Backoff
from core.settings import Settings
from tests.conftest import eventually
from tests.test_consumers_support import (
    committed,
    make_spec,
    new_batch,
    options,
    running,
    send,
    unique,
)


async def test_a_poll_applies_while_the_commit_before_it_is_in_flight(
        topics: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline_id = unique("test-evp")
    batch_id = await new_batch(redis, topics, pipeline_id, make_spec(pipeline_id))
    key = keys.batch(pipeline_id, batch_id)
    release = asyncio.Event()
    commits: list[dict[TopicPartition, int]] = []
    applied_at_commit: list[Any] = []

    async def held_commit(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int],
                          backoff: Backoff) -> Any:
        # What Redis holds when a commit starts: its poll's effect must be there already.
        applied_at_commit.append(await redis.hget(key, "off:extract:p0"))
        commits.append(offsets)
        if len(commits) == 1:
            await release.wait()  # the first poll's commit hangs (a slow broker)
        return await commit_retrying(consumer, offsets, backoff)

    monkeypatch.setattr(events_module, "commit_retrying", held_commit)

    async def offset_sent(n: int) -> None:
        event = Event("step.offsets", batch_id, pipeline_id, step="extract", offsets={"p0": n})
        await send(topics, topics.topic_events, batch_id, event.encode())

    async def offset_is(n: int) -> bool:
        return await redis.hget(key, "off:extract:p0") == str(n)

    consumer = EventsConsumer(topics, options())
    async with running(consumer):
        try:
            await offset_sent(1)
            await eventually(lambda: len(commits) == 1)
            # The first commit hangs; the next poll is applied all the same.
            await offset_sent(2)
            await eventually(lambda: offset_is(2))
            assert await committed(topics, topics.group_events, topics.topic_events) == 0
            # A third poll waits for the first commit (one commit behind at most).
            await offset_sent(3)
            await asyncio.sleep(1.0)  # a condition that must NOT happen: nothing to await
            assert await offset_is(2)
        finally:
            release.set()  # so the consumer can stop whatever happened
        await eventually(lambda: offset_is(3))
        await eventually(lambda: _committed_is(topics, 3), timeout=20)
    # Each commit started after its own poll's effect (a later poll's may be there too), and
    # the commits went in order.
    assert len(commits) == 3
    assert all(int(seen or 0) >= n for n, seen in enumerate(applied_at_commit, start=1))
    assert [sum(o.values()) for o in commits] == [1, 2, 3]


async def _committed_is(settings: Settings, n: int) -> bool:
    return await committed(settings, settings.group_events, settings.topic_events) == n
