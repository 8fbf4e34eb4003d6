"""The TTL backstop: an entry is dropped after its time even when no invalidation ever comes
(a write that did not publish, an operator's edit), while the feed itself stays healthy."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from redis.asyncio import Redis

from core import keys
from core.settings import Settings
from service.cache import BatchCache
from tests.cache_support import PIPELINE, cache_of, cached_api, direct_store, engines, get, new_batches


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    yield from engines("redis")


async def test_an_unannounced_change_shows_once_the_entry_expires(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [batch_id] = await new_batches(store)
    ttl = 1.0
    async with cached_api(test_settings, BatchCache(ttl_s=ttl)) as api:
        cache = cache_of(api)
        await get(api, batch_id)
        hits = cache.hits
        assert (await get(api, batch_id))[1]["state"]["state"] == "pending"
        assert cache.hits == hits + 1
        # Changed behind the feed's back: no PUBLISH.
        await redis.hset(keys.batch(PIPELINE, batch_id), "state", "running")
        loop = asyncio.get_running_loop()
        changed = loop.time()
        while (await get(api, batch_id))[1]["state"]["state"] != "running":
            assert loop.time() - changed < ttl + 1.0, "the entry outlived its TTL"
            await asyncio.sleep(0.02)
        took = loop.time() - changed
        print(f"an unannounced change showed after {took:.2f}s (ttl {ttl}s)")
        # The feed was never in doubt: the cache stayed on and serves the new value.
        assert cache.live
        hits = cache.hits
        await get(api, batch_id)
        assert cache.hits == hits + 1


async def test_entries_are_served_until_their_ttl(test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [batch_id] = await new_batches(store)
    async with cached_api(test_settings, BatchCache(ttl_s=30.0)) as api:
        cache = cache_of(api)
        await get(api, batch_id)
        hits = cache.hits
        for _ in range(20):
            await get(api, batch_id)
        assert cache.hits == hits + 20
