"""Per-key invalidation: traffic on other batches never stops one batch from being cached, and
a fill that raced an invalidation of its own key is never stored."""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core.codec import Event
from core.settings import Settings
from core.store import BatchStore
from service.cache import BatchCache
from tests.cache_support import (
    PIPELINE,
    cache_of,
    cached_api,
    direct_store,
    engines,
    get,
    new_batches,
    proxied,
)
from tests.conftest import eventually


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    yield from engines("redis")


def _live_cache(**options: float) -> BatchCache:
    cache = BatchCache(**options)  # type: ignore[arg-type]
    cache.reset(live=True)
    return cache


def test_a_fill_survives_invalidations_of_other_keys() -> None:
    cache = _live_cache()
    generation = cache.generation
    for n in range(100):
        cache.evict(f"other:{n}")
    cache.put("mine", b"v1", generation)
    assert cache.get("mine") == b"v1"


def test_a_fill_that_raced_its_own_invalidation_is_refused() -> None:
    cache = _live_cache()
    generation = cache.generation
    cache.evict("mine")
    cache.evict("other")
    cache.put("mine", b"stale", generation)
    assert cache.get("mine") is None
    # A read that began after the invalidation is fine.
    cache.put("mine", b"fresh", cache.generation)
    assert cache.get("mine") == b"fresh"


def test_a_fill_from_before_a_reset_is_refused() -> None:
    cache = _live_cache()
    generation = cache.generation
    cache.reset(live=True)  # a resubscription: invalidations may have been missed meanwhile
    cache.put("mine", b"stale", generation)
    assert cache.get("mine") is None


def test_remembered_invalidations_are_bounded_and_forgetting_one_is_safe() -> None:
    cache = _live_cache(recent_max=64)
    generation = cache.generation
    cache.evict("mine")
    for n in range(1000):
        cache.evict(f"other:{n}")
    assert cache.remembered() <= 64
    # "mine" was forgotten: a fill that began before it must still be refused...
    cache.put("mine", b"stale", generation)
    assert cache.get("mine") is None
    # ...while fills that began after the forgotten ones go in.
    later = cache.generation
    cache.evict("other:5")
    cache.put("mine", b"fresh", later)
    assert cache.get("mine") == b"fresh"


def test_entries_are_bounded() -> None:
    cache = _live_cache(max_entries=10)
    for n in range(50):
        cache.put(f"k{n}", b"v", cache.generation)
    assert len(cache) == 10
    assert cache.get("k49") == b"v" and cache.get("k0") is None


async def _churn(store: BatchStore, batch_ids: list[str], pause: float,
                 stop: asyncio.Event) -> None:
    """Offset events to `batch_ids` in turn, each one a real change that publishes, until
    `stop` (not cancelled: redis-py on Python 3.11 can swallow a cancellation)."""
    for n in itertools.count(1):
        if stop.is_set():
            return
        batch_id = batch_ids[n % len(batch_ids)]
        await store.apply([Event("step.offsets", batch_id, PIPELINE, step="extract",
                                 offsets={"0": n})])
        await asyncio.sleep(pause)


async def test_one_batch_is_served_from_cache_while_others_change(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    target, *others = await new_batches(store, 6)
    async with proxied(test_settings) as (proxy, through), cached_api(through) as api:
        cache = cache_of(api)
        # Every read through the proxy now takes >= 60 ms, while other batches change every
        # few ms: with one global generation no fill would ever be stored.
        proxy.latency_s = 0.03
        stop = asyncio.Event()
        writer = asyncio.create_task(_churn(store, others, 0.002, stop))
        try:
            start = cache.generation
            await eventually(lambda: cache.generation > start + 20, timeout=10)
            hits, misses = cache.hits, cache.misses
            for _ in range(30):
                status, _body = await get(api, target)
                assert status == 200
            print(f"hits {cache.hits - hits}, misses {cache.misses - misses} of 30 GETs, "
                  f"{cache.generation - start} invalidations")
            assert cache.hits - hits >= 25
        finally:
            stop.set()
            await writer


async def _race_round(api: TestClient[Any, Any], store: BatchStore, target: str,
                      first: int, n: int) -> int:
    """8 readers GET `target` while it changes `n` times; returns its last offset."""
    stop = asyncio.Event()

    async def reader() -> None:
        while not stop.is_set():
            await get(api, target)

    readers = [asyncio.create_task(reader()) for _ in range(8)]
    for offset in range(first, first + n):
        await store.apply([Event("step.offsets", target, PIPELINE, step="extract",
                                 offsets={"0": offset})])
        await asyncio.sleep(0.003)
    stop.set()
    await asyncio.gather(*readers)
    return first + n - 1


async def test_no_invalidation_of_a_batch_is_lost_to_a_racing_fill(
        test_settings: Settings, redis: Redis) -> None:
    """Concurrent GETs of one batch while it changes, then it stops changing: every GET after
    its last invalidation arrived shows the last value (a stale fill would stay for the TTL)."""
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    async with proxied(test_settings) as (proxy, through), cached_api(through) as api:
        proxy.latency_s = 0.005

        async def shows(offset: int) -> bool:
            _status, body = await get(api, target)
            return bool(body["state"]["steps"]["extract"]["offsets"] == {"0": offset})

        for round_ in range(1, 6):
            last = await _race_round(api, store, target, round_ * 100, 30)
            await eventually(functools.partial(shows, last), timeout=2)
            # And it stays so (from the cache): nothing stale was stored behind it.
            for _ in range(5):
                assert await shows(last)
