"""A step's rate counts from when it began running by its running event's `ts`, up to its
end by its final state's `ts` (while it runs, up to its last move as applied): a consumer
that applies a backlog at once must not show a step that made 100,000 records in 100 s as
doing millions a second, nor, the backlog an hour late, 27 a second."""

from __future__ import annotations

import time
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from core import keys
from core.codec import Event
from core.models import iso_of, new_batch_id, now_iso
from core.scripts import Scripts
from core.store import BatchStore
from tests.helpers import spec

P = "pipe-rate"
STEP = "extract"


@pytest.fixture
def store(redis: Redis, scripts: Scripts) -> BatchStore:
    return BatchStore(redis, scripts, token_secret=b"secret")


async def _running_batch(store: BatchStore) -> str:
    b = new_batch_id()
    await store.create(P, b, spec())
    await store.apply([Event("batch.state", b, P, state="running")])
    return b


async def _rate(store: BatchStore, b: str) -> Any:
    rendered = await store.get(P, b)
    assert rendered is not None
    return rendered["state"]["steps"][STEP]["progress"]["records_per_s"]


async def test_a_backlog_applied_at_once_shows_the_rate_the_step_ran_at(
        store: BatchStore, redis: Redis) -> None:
    b = await _running_batch(store)
    # Created 200 s ago; its step began 100 s ago, and its events arrive only now.
    await redis.hset(keys.batch(P, b), "created_at", iso_of(time.time() - 200))
    began = time.time() - 100
    await store.apply([Event("step.state", b, P, step=STEP, state="running", ts=began),
                       Event("step.offsets", b, P, step=STEP, offsets={"p0": 100_000},
                             ts=began + 100)])
    rate = await _rate(store, b)
    assert rate is not None and 900 <= rate <= 1_100, rate


async def test_a_step_that_ended_an_hour_before_its_backlog_shows_the_rate_it_ran_at(
        store: BatchStore, redis: Redis) -> None:
    b = await _running_batch(store)
    await redis.hset(keys.batch(P, b), "created_at", iso_of(time.time() - 7_200))
    began = time.time() - 3_700  # ran 100 s, an hour ago; its events arrive only now
    await store.apply([Event("step.state", b, P, step=STEP, state="running", ts=began),
                       Event("step.offsets", b, P, step=STEP, offsets={"p0": 100_000},
                             ts=began + 100),
                       Event("step.state", b, P, step=STEP, state="success", ts=began + 100)])
    rate = await _rate(store, b)
    assert rate is not None and 990 <= rate <= 1_010, rate


async def test_a_start_stamped_ahead_of_now_counts_from_now(
        store: BatchStore, redis: Redis) -> None:
    b = await _running_batch(store)
    before = now_iso()
    await store.apply([Event("step.state", b, P, step=STEP, state="running",
                             ts=time.time() + 3_600)])
    started = await redis.hget(keys.batch(P, b), "started:" + STEP)
    assert started is not None and before <= cast(str, started) <= now_iso()


async def test_a_start_stamped_before_the_batch_existed_counts_from_its_creation(
        store: BatchStore, redis: Redis) -> None:
    b = await _running_batch(store)
    await store.apply([Event("step.state", b, P, step=STEP, state="running", ts=0.0)])
    fields = cast(dict[str, str], await redis.hgetall(keys.batch(P, b)))
    assert fields["started:" + STEP] == fields["created_at"]


async def test_a_start_applied_again_keeps_the_first(store: BatchStore, redis: Redis) -> None:
    b = await _running_batch(store)
    first = time.time() - 50
    await store.apply([Event("step.state", b, P, step=STEP, state="running", ts=first)])
    held = await redis.hget(keys.batch(P, b), "started:" + STEP)
    await store.apply([Event("step.state", b, P, step=STEP, state="running", ts=first - 20)])
    assert await redis.hget(keys.batch(P, b), "started:" + STEP) == held
