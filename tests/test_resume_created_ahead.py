"""A resume records the `created_at` Redis gave its batch, which a create raises to the newest
listed batch's (CREATE_BATCH). A diff review found the first version of the `Recorded`
checks refusing one more than a day ahead on construction: one batch created by an API host
whose clock ran ahead made every resume of the pipeline answer 500 on healthy hosts. Such a
time is now refused only where it would be written as new, the consumer's restore of a batch
Redis lost."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis

from core.codec import Event
from core.registry import PipelineRegistry
from core.scripts import Scripts
from core.settings import Settings
from core.store import BatchStore
from tests.helpers import AUTH, api_client, api_settings, spec
from tests.test_consumers_support import unique


async def test_a_resume_after_a_batch_stamped_ahead_is_answered_and_sent(
        topics: Settings, redis: Redis) -> None:
    p = unique("p-ahead")
    await PipelineRegistry(redis, Scripts(redis)).register(p, spec())
    store = BatchStore(redis, Scripts(redis), token_secret=b"t")
    async with api_client(api_settings(topics)) as api:
        resp = await api.post(f"/api/v1/batches/{p}", headers=AUTH)
        assert resp.status == 200, await resp.text()
        failed = (await resp.json())["item"]
        await store.apply([Event("batch.state", failed, p, event_id=f"{failed}-1",
                                 state="stop", outcome="failed", reason="on purpose")])
        # A batch the API host whose clock runs two days ahead created (its POST's create).
        ahead = (datetime.now(UTC) + timedelta(days=2)).isoformat(
            timespec="milliseconds").replace("+00:00", "Z")
        assert await store.create(p, unique("batch-skewed"), spec(), created_at=ahead)
        # The resume, on a healthy host.
        resp = await api.post(f"/api/v1/batches/{p}/{failed}/resume", headers=AUTH)
        text = await resp.text()
        listed = await (await api.get(f"/api/v1/batches/{p}/", headers=AUTH)).json()
        assert resp.status == 200, (
            f"resume answered {resp.status} {text[:300]}; the pipeline lists "
            f"{listed['items']}")
