"""A pipeline's push stream when no message says a batch changed.

- A body can change at the same rev: a step's `stalled` is decided when the batch is
  rendered. The stream's backstop read skipped any batch whose rev was the one it had sent,
  so the pipeline's stream never showed `stalled`, while the batch's own stream and GET did.
  A batch beyond the first page was checked by its rev alone, so it never showed it either.
- While the cache's feed is down nothing wakes a stream: batch streams and long-polls read
  again every second (DEGRADED_POLL_S); the pipeline's stream waited for its backstop (the
  cache's TTL), and for ever with a TTL of 0."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse
from redis.asyncio import Redis

import core.layout
from core.codec import Event
from core.models import new_batch_id
from core.settings import Settings
from service.cache import BatchCache
from tests.cache_support import cache_of, cached_api, direct_store, engines, proxied
from tests.conftest import eventually
from tests.helpers import spec
from tests.tcp_proxy import sent
from tests.test_api_streams import SSE, next_event


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    yield from engines("redis")


async def _first_batch(stream: ClientResponse, seconds: float,
                       shows: Any) -> dict[str, Any] | None:
    """The first `batch` event within `seconds` whose body passes `shows`, else None."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while (left := end - loop.time()) > 0:
        try:
            item = await next_event(stream, timeout=left)
        except TimeoutError:
            return None
        if item.get("event") == "batch":
            body: dict[str, Any] = orjson.loads(item["data"])
            if shows(body):
                return body
    return None


async def test_a_batch_going_stalled_is_sent_again_within_a_ttl(
        test_settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core.layout, "stall_after_s", lambda: 1.0)
    pipeline = f"stall-{uuid.uuid4().hex[:8]}"
    store = direct_store(redis, test_settings)
    batch_id = new_batch_id()
    await store.create(pipeline, batch_id, spec())
    await store.apply([Event("batch.state", batch_id, pipeline, state="running"),
                       Event("step.state", batch_id, pipeline, step="extract", state="running")])
    async with cached_api(test_settings, BatchCache(ttl_s=0.5, silence_s=2.5)) as api:
        stream = await api.get(f"/api/v1/batches/{pipeline}/", headers=SSE)
        first = orjson.loads((await next_event(stream))["data"])
        assert "stalled" not in first
        stalled = await _first_batch(stream, 4, lambda body: body.get("stalled") is True)
        stream.close()
    assert stalled is not None and stalled["id"] == batch_id


async def test_a_batch_beyond_the_page_going_stalled_is_sent_again(
        test_settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream sends the changes of batches beyond its first page too; one it sent
    running, off the page, that goes stalled (same rev) is sent again as it is for one on
    the page."""
    monkeypatch.setattr(core.layout, "stall_after_s", lambda: 1.0)
    pipeline = f"stall-{uuid.uuid4().hex[:8]}"
    store = direct_store(redis, test_settings)
    older, newest = new_batch_id(), new_batch_id()
    await store.create(pipeline, older, spec())
    await store.create(pipeline, newest, spec())
    async with cached_api(test_settings, BatchCache(ttl_s=0.5, silence_s=2.5)) as api:
        stream = await api.get(f"/api/v1/batches/{pipeline}/", headers=SSE,
                               params={"limit": "1"})
        assert orjson.loads((await next_event(stream))["data"])["id"] == newest
        await store.apply([Event("batch.state", older, pipeline, state="running"),
                           Event("step.state", older, pipeline, step="extract",
                                 state="running")])
        running = await _first_batch(stream, 4, lambda body: body["id"] == older)
        assert running is not None and "stalled" not in running
        stalled = await _first_batch(stream, 5, lambda body: body.get("stalled") is True)
        stream.close()
    assert stalled is not None and stalled["id"] == older


@pytest.mark.parametrize("ttl_s", [10.0, 0.0])
async def test_a_change_reaches_it_within_a_poll_while_the_feed_is_down(
        test_settings: Settings, redis: Redis, ttl_s: float) -> None:
    pipeline = f"degraded-{uuid.uuid4().hex[:8]}"
    store = direct_store(redis, test_settings)
    batch_id = new_batch_id()
    await store.create(pipeline, batch_id, spec())
    async with proxied(test_settings) as (proxy, through), \
            cached_api(through, BatchCache(ttl_s=ttl_s)) as api:
        stream = await api.get(f"/api/v1/batches/{pipeline}/", headers=SSE)
        assert (await next_event(stream))["event"] == "batch"
        proxy.blackhole(sent(b"SUBSCRIBE"), sticky=True)  # the feed goes silent, stays down
        cache = cache_of(api)
        await eventually(lambda: not cache.live, timeout=10)
        await store.apply([Event("batch.state", batch_id, pipeline, state="running")])
        started = asyncio.get_running_loop().time()
        running = await _first_batch(stream, 8,
                                     lambda body: body["state"]["state"] == "running")
        took = asyncio.get_running_loop().time() - started
        stream.close()
    assert running is not None, "never sent while the feed was down"
    assert took < 2.5
