"""A held long-poll and a change made without a message (FLUSHDB, a forced rebuild): the
streams read Redis at least every `cache.ttl_s` (the GET cache's own backstop); a long-poll
held for up to 60 s must not answer 304 for a batch a GET already shows changed or gone."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from redis.asyncio import Redis

from core import keys
from core.settings import Settings
from service.appkeys import WAITERS
from service.cache import BatchCache
from tests.cache_support import PIPELINE, cache_of, cached_api, direct_store, engines, new_batches
from tests.conftest import eventually
from tests.helpers import AUTH


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    yield from engines("redis")


async def test_a_held_long_poll_learns_within_the_cache_ttl_of_a_delete_without_a_message(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    ttl = 1.0
    # The cache's clock a long tick behind (0.9 s): an entry stored just before the wait has
    # an expiry that clock has mostly not reached when the wait ends.
    async with cached_api(test_settings, cache=BatchCache(ttl_s=ttl, tick_s=0.9)) as api:
        path = f"/api/v1/batches/{PIPELINE}/{target}"
        response = await api.get(path, headers=AUTH)
        etag = response.headers["ETag"]
        loop = asyncio.get_running_loop()
        started = loop.time()
        held = asyncio.create_task(api.get(path, params={"wait": "8"},
                                           headers={**AUTH, "If-None-Match": etag}))
        await eventually(lambda: len(api.app[WAITERS]) == 1, timeout=5, interval=0.01)
        await redis.delete(keys.batch(PIPELINE, target))  # gone, and no message says so
        answer = await held
        took = loop.time() - started
        assert cache_of(api).live

        async def plain_get_404() -> bool:  # what GET says too, once the entry expired
            return (await api.get(path, headers=AUTH)).status == 404
        await eventually(plain_get_404, timeout=3, interval=0.1)
    # Within one TTL (and a margin): its re-read after a wait nothing woke is Redis's. Through
    # the cache, an entry whose expiry the cache's clock (a tick behind) had not reached yet
    # held it a second TTL (diff review).
    assert answer.status == 404 and took < ttl + 0.6, \
        f"the long-poll answered {answer.status} after {took:.1f}s for a batch GET says is gone"
