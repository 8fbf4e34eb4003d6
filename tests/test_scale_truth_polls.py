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
from service.cache import BatchCache
from tests.cache_support import PIPELINE, cache_of, cached_api, direct_store, engines, new_batches
from tests.helpers import AUTH


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    yield from engines("redis")


async def test_a_held_long_poll_learns_within_the_cache_ttl_of_a_delete_without_a_message(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    async with cached_api(test_settings, cache=BatchCache(ttl_s=0.5)) as api:
        path = f"/api/v1/batches/{PIPELINE}/{target}"
        response = await api.get(path, headers=AUTH)
        etag = response.headers["ETag"]
        loop = asyncio.get_running_loop()
        started = loop.time()
        held = asyncio.create_task(api.get(path, params={"wait": "4"},
                                           headers={**AUTH, "If-None-Match": etag}))
        await asyncio.sleep(0.2)
        await redis.delete(keys.batch(PIPELINE, target))  # gone, and no message says so
        answer = await held
        took = loop.time() - started
        plain = await api.get(path, headers=AUTH)
        assert cache_of(api).live
    assert plain.status == 404  # what GET says by now (the entry expired)
    assert answer.status == 404 and took < 2, \
        f"the long-poll answered {answer.status} after {took:.1f}s for a batch GET says is gone"
