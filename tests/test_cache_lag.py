"""What GET, long-polls and push streams show while the change feed lags behind reads.

The feed (pub/sub) and the reads (HGETALL) travel on different connections: a lagging feed
delivers a change's message after a read that already saw it, or saw a newer change. Versions
are ordered by the batch hash's `rev` (every script that changes a batch bumps it), so a late
message never takes anything backwards."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterator

import orjson
import pytest
from aiohttp import ClientResponse
from redis.asyncio import Redis

from core.settings import Settings
from tests.cache_support import (
    PIPELINE,
    cache_of,
    cached_api,
    direct_store,
    engines,
    new_batches,
    set_offset,
)
from tests.helpers import AUTH
from tests.lagging_feed import lagging_feed

SSE = {**AUTH, "Accept": "text/event-stream"}
LAG_S = 0.4


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    yield from engines("redis")


def offset_of(body: bytes | str) -> int | None:
    offsets: dict[str, int] = orjson.loads(body)["state"]["steps"]["extract"]["offsets"]
    return offsets.get("0")


async def batch_offsets(response: ClientResponse) -> list[int | None]:
    """The offsets of the `batch` events a stream sends until it is quiet for 4 lags."""
    seen: list[int | None] = []
    fields: dict[str, str] = {}
    with contextlib.suppress(TimeoutError):
        while True:
            async with asyncio.timeout(LAG_S * 4):
                line = (await response.content.readline()).decode().rstrip("\n")
            if line:
                name, _, value = line.partition(":")
                if name:
                    fields[name] = value.removeprefix(" ")
            elif fields:
                if fields.get("event") != "batch":
                    break
                seen.append(offset_of(fields["data"]))
                fields = {}
    response.close()
    return seen


async def two_changes(store: object, target: str) -> None:
    """Offset 1, then 2, their messages reaching the feed in separate reads."""
    await set_offset(store, target, 1)  # type: ignore[arg-type]
    await asyncio.sleep(0.1)
    await set_offset(store, target, 2)  # type: ignore[arg-type]


async def test_a_batch_stream_opened_while_its_feed_lags_sends_no_older_state_nor_a_repeat(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    async with lagging_feed(test_settings, LAG_S) as settings, cached_api(settings) as api:
        await set_offset(store, target, 1)
        await set_offset(store, target, 2)
        response = await api.get(f"/api/v1/batches/{PIPELINE}/{target}", headers=SSE)
        assert response.status == 200
        seen = await batch_offsets(response)
    assert seen == [2], f"the stream sent offsets {seen}"


async def test_a_cached_get_never_answers_older_than_an_earlier_get(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    async with lagging_feed(test_settings, LAG_S) as settings, cached_api(settings) as api:
        path = f"/api/v1/batches/{PIPELINE}/{target}"
        await two_changes(store, target)
        answers: list[int | None] = []
        loop = asyncio.get_running_loop()
        until = loop.time() + LAG_S * 3
        while loop.time() < until:
            response = await api.get(path, headers=AUTH)
            assert response.status == 200
            answers.append(offset_of(await response.read()))
            await asyncio.sleep(0.01)
        assert cache_of(api).live and cache_of(api).hits > 0
    assert answers[0] == 2
    assert set(answers) == {2}, f"GET answered offsets {sorted(set(answers), key=answers.index)}"


async def test_a_long_poll_never_answers_older_than_the_version_it_named(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    async with lagging_feed(test_settings, LAG_S) as settings, cached_api(settings) as api:
        path = f"/api/v1/batches/{PIPELINE}/{target}"
        await two_changes(store, target)
        response = await api.get(path, headers=AUTH)
        assert offset_of(await response.read()) == 2
        etag = response.headers["ETag"]
        held = await api.get(path, params={"wait": "1"},
                             headers={**AUTH, "If-None-Match": etag})
        body = await held.read()
    assert held.status == 304, f"answered {held.status} with offset {offset_of(body)}"


async def test_a_pipeline_stream_never_sends_a_batch_older_than_it_sent(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    async with lagging_feed(test_settings, LAG_S) as settings, cached_api(settings) as api:
        await two_changes(store, target)
        response = await api.get(f"/api/v1/batches/{PIPELINE}/", headers=SSE)
        assert response.status == 200
        seen = await batch_offsets(response)
    assert seen[0] == 2
    assert all(a is not None and b is not None and b >= a
               for a, b in itertools.pairwise(seen)), f"the stream sent offsets {seen}"
