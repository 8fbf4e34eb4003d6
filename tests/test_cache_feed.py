"""The cache's invalidation feed under a silent network fault: a proxy that keeps the
subscription's sockets open but drops its bytes (a NAT or load balancer that forgot the flow).
GET must reflect a change within 5 s, with the cache's default settings."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core.codec import Event
from core.settings import Settings
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
from tests.tcp_proxy import TcpProxy, sent

BOUND_S = 5.0
SUBSCRIPTION = sent(b"SUBSCRIBE")


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    yield from engines("redis")


async def _cached(api: TestClient[Any, Any], batch_id: str) -> dict[str, Any]:
    """Reads the batch until the cache serves it (a hit), and returns it."""
    cache = cache_of(api)

    async def hit() -> dict[str, Any] | None:
        hits = cache.hits
        status, body = await get(api, batch_id)
        assert status == 200
        return body if cache.hits > hits else None

    return await eventually(hit, timeout=5)  # type: ignore[return-value]


async def _fresh_within(api: TestClient[Any, Any], batch_id: str, expect: Any,
                        bound: float = BOUND_S) -> float:
    """Polls GET until `expect((status, body))` holds; the seconds it took (fails past bound)."""
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def ok() -> bool:
        return bool(expect(await get(api, batch_id)))

    await eventually(ok, timeout=bound, interval=0.05)
    return loop.time() - started


def _running(answer: tuple[int, dict[str, Any]]) -> bool:
    status, body = answer
    return status == 200 and body["state"]["state"] == "running"


@contextlib.asynccontextmanager
async def _proxied_api(settings: Settings) -> AsyncIterator[tuple[TcpProxy, TestClient[Any, Any]]]:
    async with proxied(settings) as (proxy, through), cached_api(through) as api:
        yield proxy, api


async def test_change_reaches_get_within_bound_when_subscription_is_blackholed(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [batch_id] = await new_batches(store)
    async with _proxied_api(test_settings) as (proxy, api):
        assert (await _cached(api, batch_id))["state"]["state"] == "pending"
        assert proxy.blackhole(SUBSCRIPTION) == 1
        await store.apply([Event("batch.state", batch_id, PIPELINE, state="running")])
        took = await _fresh_within(api, batch_id, _running)
        print(f"fresh {took:.2f}s after the change, feed blackholed")

        # The cache resubscribed on a new connection by itself and serves again.
        assert (await _cached(api, batch_id))["state"]["state"] == "running"
        assert cache_of(api).live


async def test_stopped_and_hidden_batch_is_404_within_bound_while_every_subscription_is_dropped(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [batch_id] = await new_batches(store)
    async with _proxied_api(test_settings) as (proxy, api):
        cache = cache_of(api)
        await _cached(api, batch_id)
        proxy.blackhole(SUBSCRIPTION, sticky=True)
        await store.apply([Event("batch.state", batch_id, PIPELINE, state="stop",
                                 outcome="cancelled")])
        await store.hide(PIPELINE, batch_id)
        await _fresh_within(api, batch_id, lambda answer: answer[0] == 404)

        # No subscription can be confirmed: the cache stays off and GET reads Redis.
        [other] = await new_batches(store)
        await store.apply([Event("batch.state", other, PIPELINE, state="running")])
        for _ in range(3):
            assert _running(await get(api, other))
        assert not cache.live
        await store.apply([Event("batch.state", other, PIPELINE, state="stop",
                                 outcome="completed")])
        status, body = await get(api, other)
        assert status == 200 and body["state"]["state"] == "stop"

        # The network heals: the cache comes back on its own.
        proxy.forward()
        await eventually(lambda: cache.live, timeout=15)
        assert (await _cached(api, other))["state"]["state"] == "stop"


async def test_each_of_two_api_processes_is_fresh_within_bound(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [batch_id] = await new_batches(store)
    async with _proxied_api(test_settings) as (proxy_a, api_a), \
            _proxied_api(test_settings) as (proxy_b, api_b):
        for api in (api_a, api_b):
            await _cached(api, batch_id)
        # A's subscription goes silent for good, B's only until it resubscribes.
        proxy_a.blackhole(SUBSCRIPTION, sticky=True)
        proxy_b.blackhole(SUBSCRIPTION)
        await store.apply([Event("batch.state", batch_id, PIPELINE, state="running")])
        took = await asyncio.gather(_fresh_within(api_a, batch_id, _running),
                                    _fresh_within(api_b, batch_id, _running))
        print(f"fresh after {took[0]:.2f}s (A) and {took[1]:.2f}s (B)")


async def test_a_cut_subscription_turns_the_cache_off_at_once_and_it_comes_back(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [batch_id] = await new_batches(store)
    async with _proxied_api(test_settings) as (proxy, api):
        cache = cache_of(api)
        await _cached(api, batch_id)
        outages = cache.outages
        assert proxy.cut(SUBSCRIPTION) == 1
        await eventually(lambda: cache.outages > outages, timeout=1)
        await store.apply([Event("batch.state", batch_id, PIPELINE, state="running")])
        await _fresh_within(api, batch_id, _running, bound=1)
        await eventually(lambda: cache.live, timeout=5)
        assert (await _cached(api, batch_id))["state"]["state"] == "running"


async def test_a_quiet_feed_stays_live_on_its_pongs(redis: Redis) -> None:
    """Nothing published for several silence bounds (a channel of its own): the PINGs' answers
    keep the cache on, and a message still evicts afterwards."""
    cache = BatchCache(silence_s=1.2)
    channel = f"dhub:test:quiet:{uuid.uuid4().hex}"
    follower = asyncio.create_task(cache.follow(redis, channel))
    try:
        await eventually(lambda: cache.live, timeout=5)
        await asyncio.sleep(3 * cache.silence_s)  # the point is that nothing happens meanwhile
        assert cache.live and cache.outages == 0
        cache.put("k", b"v", cache.generation)
        assert cache.get("k") == b"v"
        await redis.publish(channel, "k")
        await eventually(lambda: cache.get("k") is None, timeout=2)
        assert cache.live
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
    assert not cache.live


async def test_the_follower_always_stops_when_cancelled(redis: Redis) -> None:
    """Cancelled at any point (subscribing, pinging, reading), the follower ends at once: the
    app's shutdown awaits it. A swallowed cancellation would leave this waiting."""
    channel = f"dhub:test:stop:{uuid.uuid4().hex}"
    for n in range(40):
        cache = BatchCache(silence_s=0.3, tick_s=0.05, ping_s=0.01)
        follower = asyncio.create_task(cache.follow(redis, channel))
        await asyncio.sleep((n % 10) * 0.005)
        follower.cancel()
        done, _ = await asyncio.wait([follower], timeout=2)
        assert done, f"the follower ignored its cancellation (round {n})"
        assert not cache.live
