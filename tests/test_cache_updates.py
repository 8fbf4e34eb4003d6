"""A change message that carries the batch's new hash replaces the cached entry: a watched
batch keeps being served from the cache while events change it, and never a stale value."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest
from redis.asyncio import Redis

from core.codec import Event
from core.layout import render
from core.settings import Settings
from service.cache import BatchCache
from tests.cache_support import PIPELINE, cache_of, cached_api, direct_store, engines, get, new_batches
from tests.conftest import eventually


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    yield from engines("redis")


def _live_cache() -> BatchCache:
    cache = BatchCache()
    cache.reset(live=True)
    return cache


FIELDS = {"id": "b1", "name": "n", "deployment": "d", "state": "running", "pipeline_id": "p",
          "pipeline_version": "1", "created_at": "t0", "updated_at": "t1",
          "steps": '["extract"]', "step:extract": "running", "off:extract:0": "7", "rev": "3"}


def _published(fields: dict[str, str]) -> str:
    return orjson.dumps([x for pair in fields.items() for x in pair]).decode()


def test_an_update_replaces_a_held_entry_and_is_rendered_on_its_first_get() -> None:
    cache = _live_cache()
    cache.put("k", b"old", cache.generation)
    cache.update("k", _published(FIELDS))
    assert cache.get("k") == orjson.dumps(render(FIELDS))
    assert cache.get("k") == orjson.dumps(render(FIELDS))  # rendered once, kept


def test_an_update_of_a_key_not_held_stores_nothing() -> None:
    cache = _live_cache()
    cache.update("k", _published(FIELDS))
    assert cache.get("k") is None and len(cache) == 0


def test_an_update_to_a_hidden_batch_serves_nothing() -> None:
    cache = _live_cache()
    cache.put("k", b"old", cache.generation)
    cache.update("k", _published({**FIELDS, "deleted": "1"}))
    assert cache.get("k") is None and len(cache) == 0


def test_a_fill_that_began_before_an_update_is_refused() -> None:
    cache = _live_cache()
    cache.put("k", b"old", cache.generation)
    generation = cache.generation
    cache.update("k", _published(FIELDS))
    cache.put("k", b"read before the change", generation)
    assert cache.get("k") == orjson.dumps(render(FIELDS))


def test_an_unreadable_update_is_a_miss_not_an_error() -> None:
    cache = _live_cache()
    cache.put("k", b"old", cache.generation)
    cache.update("k", "[\"id\"")
    assert cache.get("k") is None and len(cache) == 0


async def test_a_watched_batch_stays_a_hit_while_events_change_it(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    async with cached_api(test_settings) as api:
        cache = cache_of(api)
        assert (await get(api, target))[0] == 200  # the first read fills the cache
        misses = cache.misses
        for offset in range(1, 21):
            await store.apply([Event("step.offsets", target, PIPELINE, step="extract",
                                     offsets={"0": offset})])

            async def shows(offset: int = offset) -> bool:
                _status, body = await get(api, target)
                return bool(body["state"]["steps"]["extract"]["offsets"] == {"0": offset})
            await eventually(shows, timeout=5, interval=0.005)
        # Every change arrived with its value: no GET had to read Redis.
        assert cache.misses == misses
