"""A batch's end of life under races and odd-but-legal use: the retention sweeper against
deletes, resumes and its own limits, packed batches against late events (review R1)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from redis.asyncio import Redis

from consumers.plumbing.options import ConsumerOptions
from consumers.retention import RetentionSweeper
from core import keys
from core.scripts import Scripts
from core.settings import Settings
from core.store import BatchStore
from tests.conftest import eventually
from tests.test_retention import NOW, P, batch


async def test_a_full_round_of_batches_deleted_meanwhile_is_followed_at_once(
        topics: Settings, redis: Redis, scripts: Scripts) -> None:
    """A round that hit its limit on ids of batches deleted since (their ids stay in their
    bucket) removed none, and the part then slept its interval: an expired batch behind them
    stayed an interval per limit's worth of such ids (an hour each, here)."""
    retention = topics.model_copy(update={"batch_retention_days": 30})
    store = BatchStore.from_settings(redis, retention, scripts)
    await redis.sadd(keys.PIPELINES, P)
    deleted = [await batch(store, stopped_at=NOW - timedelta(days=50)) for _ in range(4)]
    for b in deleted:
        await store.hide(P, b)
        await store.purge(P, b)
    expired = await batch(store, stopped_at=NOW - timedelta(days=40))
    options = ConsumerOptions(retention_batch=2, retention_interval_s=3600)
    part = RetentionSweeper(retention, options, clock=NOW.timestamp)
    await part.start()
    task = asyncio.create_task(part.run())
    try:
        async def swept() -> bool:
            return not await redis.exists(keys.batch(P, expired))
        await eventually(swept, timeout=10)
        assert part.swept == 1
    finally:
        await part.stop()
        await task
