"""An Idempotency-Key whose attempt died before its commit (after Kafka took its run), retried
after retention removed its batch and the purge's one-day mark expired: possible when keys
live longer than that day plus the retention (DHUB_IDEMPOTENCY_TTL_S). The take-over found
no batch and no mark, took the batch for one never created, and created and ran it again:
200, the removed, completed batch back as `pending`. An attempt older than the mark's day
now finds its batch gone (409)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from redis.asyncio import Redis

from core import keys
from core.codec import Event
from core.settings import Settings
from core.store import BatchStore
from service.appkeys import IDEMPOTENCY
from tests.helpers import AUTH, swept_at
from tests.test_post_killed import KEY, LEASE_MS, Dies, batch_ids, first_dies, registered_api, run_commands


async def test_a_key_taken_over_after_retention_removed_its_batch_does_not_run_it_again(
        topics: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    # Keys remembered a week (DHUB_IDEMPOTENCY_TTL_S=604800), finished batches a day.
    settings = topics.model_copy(update={"batch_retention_days": 1,
                                         "idempotency_ttl_s": 7 * 86_400})
    async with registered_api(settings) as api:
        keys_ = api.app[IDEMPOTENCY]
        keys_._pending_ttl_ms = LEASE_MS
        dies = Dies(keys_.commit, after=False)  # the process died after Kafka acked the run
        monkeypatch.setattr(keys_, "commit", dies)
        first = await first_dies(api, dies)
        try:
            [batch] = await batch_ids(redis)
            assert batch in await run_commands(settings, batch)
            # It ran and completed; a day and an hour later retention removed it.
            store = BatchStore.from_settings(redis, settings)
            await store.apply([Event("batch.state", batch, "p", state="running"),
                               Event("batch.state", batch, "p", state="stop",
                                     outcome="completed")])
            assert await swept_at(settings, lambda: time.time() + 3 * 86_400) == 1
            assert (await api.get(f"/api/v1/batches/p/{batch}", headers=AUTH)).status == 404
            # Another day: the purge's mark (keys.PURGED_MARK_S) has expired; the key has not.
            assert await redis.exists(keys.batch_purged("p", batch))
            await redis.delete(keys.batch_purged("p", batch))
            [record] = await redis.keys("*idem*")
            assert await redis.ttl(record) > 3 * 86_400  # the pending record lives a week
            # The client retries its POST with the same key (its answer was never received),
            # two days after its first try.
            real = time.time
            monkeypatch.setattr(time, "time", lambda: real() + 2 * 86_400)
            try:
                response = await api.post("/api/v1/batches/p", headers=KEY)
            finally:
                monkeypatch.setattr(time, "time", real)
            body: Any = await response.json()
            got = await api.get(f"/api/v1/batches/p/{batch}", headers=AUTH)
            shown = await got.json()
            assert (response.status, got.status) == (409, 404), (
                f"the removed batch is back: POST {response.status} {body}, GET "
                f"{got.status} state {shown.get('state')}")
        finally:
            dies.bury()
            await first
