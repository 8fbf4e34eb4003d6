"""GET-by-id cache misses of one loop turn are read from Redis in one pipelined round trip,
without giving up the cache's exactness (service/fills.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from core import keys
from core.codec import Event
from core.layout import render
from core.settings import Settings
from core.store import BatchStore
from service.cache import BatchCache
from service.fills import BatchFills
from tests.cache_support import PIPELINE, direct_store, engines, new_batches


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    yield from engines("redis")


class CountingPipelines:
    """Counts the pipelines a client runs and the commands in each."""

    def __init__(self, redis: Redis) -> None:
        self.sizes: list[int] = []
        self._pipeline = redis.pipeline
        redis.pipeline = self._wrap  # type: ignore[method-assign]

    def _wrap(self, *args: Any, **kwargs: Any) -> Any:
        pipe = self._pipeline(*args, **kwargs)
        execute = pipe.execute

        async def counted(*a: Any, **k: Any) -> Any:
            self.sizes.append(len(pipe.command_stack))
            return await execute(*a, **k)

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe


def _live_cache() -> BatchCache:
    cache = BatchCache()
    cache.reset(live=True)
    return cache


async def _expected(store: BatchStore, batch_id: str) -> bytes:
    return orjson.dumps(render(await store.fields(PIPELINE, batch_id) or {}))


async def test_misses_of_one_turn_share_one_round_trip(test_settings: Settings,
                                                       redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    ids = await new_batches(store, 40)
    cache = _live_cache()
    fills = BatchFills(store, cache)
    counter = CountingPipelines(redis)
    # Each batch asked for twice in the same turn: the second joins the first's queued read.
    bodies = await asyncio.gather(*(fills.read(PIPELINE, b) for b in ids + ids))
    assert counter.sizes == [40]
    for batch_id, body in zip(ids + ids, bodies, strict=True):
        assert body == await _expected(store, batch_id)
        assert cache.get(keys.batch(PIPELINE, batch_id)) == body


async def test_absent_and_deleted_batches_read_none_and_are_not_cached(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [gone] = await new_batches(store)
    await store.hide(PIPELINE, gone)
    cache = _live_cache()
    fills = BatchFills(store, cache)
    assert list(await asyncio.gather(fills.read(PIPELINE, gone),
                                     fills.read(PIPELINE, "never"))) == [None, None]
    assert len(cache) == 0


async def test_a_read_that_raced_its_batch_change_is_not_cached(test_settings: Settings,
                                                                redis: Redis) -> None:
    """The generation is noted before the pipeline is sent: an invalidation that arrives while
    the read is under way voids it (the next GET reads Redis again)."""
    store = direct_store(redis, test_settings)
    [batch_id, other] = await new_batches(store, 2)
    cache = _live_cache()
    fills = BatchFills(store, cache)
    key = keys.batch(PIPELINE, batch_id)
    pipeline = redis.pipeline

    def racing(*args: Any, **kwargs: Any) -> Any:
        pipe = pipeline(*args, **kwargs)
        execute = pipe.execute

        async def change_meanwhile(*a: Any, **k: Any) -> Any:
            result = await execute(*a, **k)
            cache.evict(key)  # the invalidation of a change made while the reply was on its way
            return result

        pipe.execute = change_meanwhile  # type: ignore[method-assign]
        return pipe

    redis.pipeline = racing  # type: ignore[method-assign]
    # Two misses in the turn: read through the pipeline.
    assert all(await asyncio.gather(fills.read(PIPELINE, batch_id), fills.read(PIPELINE, other)))
    assert cache.get(key) is None
    assert cache.get(keys.batch(PIPELINE, other)) is not None
    redis.pipeline = pipeline  # type: ignore[method-assign]
    # A lone miss: read with a plain HGETALL, raced the same way.
    hgetall = redis.hgetall

    async def change_meanwhile(name: str) -> Any:
        result = await hgetall(name)
        cache.evict(key)
        return result

    redis.hgetall = change_meanwhile  # type: ignore[assignment,method-assign]
    assert await fills.read(PIPELINE, batch_id) is not None
    assert cache.get(key) is None
    redis.hgetall = hgetall  # type: ignore[method-assign]
    await store.apply([Event("batch.state", batch_id, PIPELINE, state="running")])
    cache.evict(key)
    body = await fills.read(PIPELINE, batch_id)
    assert body is not None and orjson.loads(body)["state"]["state"] == "running"
    assert cache.get(key) == body


async def test_a_failed_read_fails_every_request_of_the_turn_and_the_next_turn_reads_again(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [batch_id] = await new_batches(store)
    broken = BatchStore(
        Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5,
                       decode_responses=True),
        store.scripts, token_secret=b"t")
    fills = BatchFills(broken, _live_cache())
    outcomes = await asyncio.gather(fills.read(PIPELINE, batch_id), fills.read(PIPELINE, "x"),
                                    return_exceptions=True)
    assert all(isinstance(o, Exception) for o in outcomes), outcomes
    await broken.redis.aclose()
    healthy = BatchFills(store, _live_cache())
    assert await healthy.read(PIPELINE, batch_id) == await _expected(store, batch_id)
