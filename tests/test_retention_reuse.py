"""Retention and reused ids: a published id is new again once its claim expires (30 days), so
with a retention longer than that one id's finished bucket may outlive its batch and name a
later batch of that id; the sweeper leaves that one to its own bucket."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis

from core import keys
from core.codec import Event
from core.registry import PipelineRegistry
from core.scripts import Scripts
from core.settings import Settings
from core.store import BatchStore
from tests.helpers import swept_at
from tests.test_commands_published import spec
from tests.test_consumers_support import unique


def iso(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


async def test_a_reused_published_id_is_not_swept_by_its_earlier_batchs_bucket(
        topics: Settings, redis: Redis) -> None:
    settings = topics.model_copy(update={"batch_retention_days": 90})
    store = BatchStore.from_settings(redis, settings)
    pipeline_id = unique("test-reuse")
    s = spec(pipeline_id, "1")
    await PipelineRegistry(redis, Scripts(redis)).register(pipeline_id, s)
    now = datetime.now(UTC)
    batch_id = unique("batch-pub")

    async def finished(at: datetime) -> None:
        await store.create(pipeline_id, batch_id, s)
        # Created an hour before its stop, as a real one would be.
        await redis.hset(keys.batch(pipeline_id, batch_id), "created_at",
                         iso(at - timedelta(hours=1)))
        await store.apply([Event("batch.state", batch_id, pipeline_id, state="stop",
                                 outcome="failed")], now=iso(at))

    # The earlier batch: stopped 90 days and 2 hours ago (its bucket expires now), deleted.
    await finished(now - timedelta(days=90, hours=2))
    await store.hide(pipeline_id, batch_id)
    await store.purge(pipeline_id, batch_id)
    # The id published again (its claim gone), its batch finished 49 days ago.
    await finished(now - timedelta(days=49))
    removed = await swept_at(settings, now.timestamp)
    assert (removed, await redis.exists(keys.batch(pipeline_id, batch_id))) == (0, 1), (
        "a batch stopped 49 days ago was removed by a 90-day retention")
    # Its own bucket, once expired, removes it.
    assert await swept_at(settings, (now + timedelta(days=42)).timestamp) == 1
    assert not await redis.exists(keys.batch(pipeline_id, batch_id))
