"""The events consumer's stages on the real Kafka and Redis: a commit (after its snapshots)
runs beside the next polls' applies (off the path to visible), the polls that waited for it
share the next commit, applies wait for a lagging commit only past a bound, and no commit is
made before its polls' effect."""

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
    events_committed_is,
    make_spec,
    new_batch,
    options,
    running,
    send,
    unique,
)


async def test_polls_apply_while_the_commit_before_them_is_in_flight(
        topics: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    commits, applied_at_commit = await _hold_first_commit(topics, redis, monkeypatch, 3)
    # Each commit started after its own polls' effect, in order, and the two polls that
    # waited for the first commit went in one.
    assert [sum(o.values()) for o in commits] == [1, 3]
    assert [int(seen or 0) for seen in applied_at_commit] == [1, 3]


async def test_applies_wait_for_a_lagging_commit_past_the_bound(
        topics: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_module, "FLUSH_BATCHES", 1)
    commits, _ = await _hold_first_commit(topics, redis, monkeypatch, 2)
    assert [sum(o.values()) for o in commits] == [1, 2, 3]


async def _hold_first_commit(topics: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch,
                             applied_while_held: int) -> tuple[list[dict[TopicPartition, int]],
                                                               list[Any]]:
    """Three polls of one batch while the first poll's commit hangs (a slow broker): the
    offset reached meanwhile is `applied_while_held`; then every poll commits."""
    pipeline_id = unique("test-evp")
    batch_id = await new_batch(redis, topics, pipeline_id, make_spec(pipeline_id))
    key = keys.batch(pipeline_id, batch_id)
    release = asyncio.Event()
    commits: list[dict[TopicPartition, int]] = []
    applied_at_commit: list[Any] = []

    async def held_commit(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int],
                          backoff: Backoff) -> Any:
        # What Redis holds when a commit starts: its polls' effect must be there already.
        applied_at_commit.append(await redis.hget(key, "off:extract:p0"))
        commits.append(offsets)
        if len(commits) == 1:
            await release.wait()
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
            await offset_sent(2)  # applied all the same, the first commit hanging
            await eventually(lambda: offset_is(2))
            await offset_sent(3)
            if applied_while_held == 3:
                await eventually(lambda: offset_is(3))
            else:
                await asyncio.sleep(1.0)  # a condition that must NOT happen: nothing to await
                assert await offset_is(2)
            assert await committed(topics, topics.group_events, topics.topic_events) == 0
        finally:
            release.set()  # so the consumer can stop whatever happened
        await eventually(lambda: offset_is(3))
        await eventually(lambda: events_committed_is(topics, 3), timeout=20)
    return commits, applied_at_commit

