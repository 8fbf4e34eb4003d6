"""What a client is shown when its requests land on different API processes (a round-robin
load balancer over two `python -m service` on one Redis).

Each process keeps its own cache from its own subscription to the change feed, and nothing
orders one process's feed with another's reads: process B's feed may deliver a change after
process A has already answered it (a busy process, a slow link). Here B reaches Redis through
a proxy that delays its subscribed connection (tests.lagging_feed), A does not."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from core.settings import ROOT, Settings
from tests.cache_support import PIPELINE, direct_store, engines, new_batches, set_offset
from tests.conftest import free_port
from tests.helpers import AUTH, STATIC_TOKEN
from tests.lagging_feed import lagging_feed

SSE = {**AUTH, "Accept": "text/event-stream"}
LAG_S = 0.6


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    yield from engines("redis", "kafka")


@contextlib.asynccontextmanager
async def api_process(settings: Settings) -> AsyncIterator[str]:
    """`python -m service` of this tree on a free port, on `settings`' Redis; its base URL
    once it answers and its cache is live (a first GET of an unknown batch is a 404 either
    way: the cache's liveness is read from its metrics)."""
    port = free_port()
    env = {**os.environ, "DHUB_API_PORT": str(port), "DHUB_API_HOST": "127.0.0.1",
           "DHUB_REDIS_URL": settings.redis_url, "DHUB_API_TOKENS": STATIC_TOKEN,
           "DHUB_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
           "DHUB_TOPIC_COMMANDS": settings.topic_commands,
           "DHUB_TOPIC_EVENTS": settings.topic_events}
    env.pop("DHUB_API_TOKEN", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        async with aiohttp.ClientSession() as session:
            while True:
                assert proc.returncode is None, f"the API exited with {proc.returncode}"
                assert loop.time() < deadline, "the API did not come up"
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{url}/metrics", headers=AUTH) as response:
                        if response.status == 200 and _cache_live(await response.text()):
                            break
                await asyncio.sleep(0.1)
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _cache_live(metrics: str) -> bool:
    for line in metrics.splitlines():
        if line.startswith("dhub_cache_live"):
            return line.rsplit(" ", 1)[-1] in ("1", "1.0")
    return True  # no such gauge: the first GETs below still wait for B's fill


def offset_of(body: bytes | str) -> int | None:
    offsets: dict[str, int] = orjson.loads(body)["state"]["steps"]["extract"]["offsets"]
    return offsets.get("0")


@contextlib.asynccontextmanager
async def two_apis(test_settings: Settings) -> AsyncIterator[tuple[str, str]]:
    """A (direct) and B (its feed LAG_S late), on the test's Redis database."""
    async with lagging_feed(test_settings, LAG_S) as lagging, \
            api_process(test_settings) as a, api_process(lagging) as b:
        yield a, b


async def _b_caches(session: aiohttp.ClientSession, b: str, path: str, offset: int) -> None:
    """Waits until B answers `offset` (its cache filled with it, past the lag)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        async with session.get(b + path, headers=AUTH) as response:
            if response.status == 200 and offset_of(await response.read()) == offset:
                # Once more after the lag: the fill is in the cache by now.
                await asyncio.sleep(LAG_S * 1.5)
                return
        assert loop.time() < deadline, f"B never answered offset {offset}"
        await asyncio.sleep(0.05)


async def _newer_on_a(session: aiohttp.ClientSession, a: str, path: str, store: Any,
                      target: str) -> str:
    """Offset 2 written, and A's answer of it: its ETag (B's feed has not delivered it)."""
    await set_offset(store, target, 2)
    async with session.get(a + path, headers=AUTH) as response:
        assert response.status == 200
        assert offset_of(await response.read()) == 2
        return response.headers["ETag"]


async def test_a_long_poll_on_b_naming_a_newer_etag_from_a_never_answers_older(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    path = f"/api/v1/batches/{PIPELINE}/{target}"
    await set_offset(store, target, 1)
    async with two_apis(test_settings) as (a, b), aiohttp.ClientSession() as session:
        await _b_caches(session, b, path, 1)
        etag = await _newer_on_a(session, a, path, store, target)
        async with session.get(b + path, params={"wait": "2"},
                               headers={**AUTH, "If-None-Match": etag}) as held:
            body = await held.read()
            status = held.status
    assert status == 304 or offset_of(body) == 2, \
        f"B answered {status} with offset {offset_of(body)} after A's offset 2"


async def test_a_conditional_get_on_b_naming_a_newer_etag_from_a_never_answers_older(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    path = f"/api/v1/batches/{PIPELINE}/{target}"
    await set_offset(store, target, 1)
    async with two_apis(test_settings) as (a, b), aiohttp.ClientSession() as session:
        await _b_caches(session, b, path, 1)
        etag = await _newer_on_a(session, a, path, store, target)
        async with session.get(b + path, headers={**AUTH, "If-None-Match": etag}) as answer:
            body = await answer.read()
            status = answer.status
    assert status == 304 or offset_of(body) == 2, \
        f"B answered {status} with offset {offset_of(body)} after A's offset 2"


async def test_a_stream_resumed_on_b_with_a_last_event_id_from_a_sends_no_older_nor_a_repeat(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    path = f"/api/v1/batches/{PIPELINE}/{target}"
    await set_offset(store, target, 1)
    async with two_apis(test_settings) as (a, b), aiohttp.ClientSession() as session:
        await _b_caches(session, b, path, 1)
        etag = await _newer_on_a(session, a, path, store, target)
        async with session.get(b + path, headers={**SSE, "Last-Event-ID": etag}) as stream:
            assert stream.status == 200
            seen = await _batch_offsets(stream, LAG_S * 3)
            await set_offset(store, target, 3)
            seen += await _batch_offsets(stream, LAG_S * 3)
    assert seen == [3], f"B's stream, resumed after A's offset 2, sent offsets {seen}"


async def _batch_offsets(stream: aiohttp.ClientResponse, quiet_s: float) -> list[int | None]:
    """The offsets of the `batch` events the stream sends until it is quiet for `quiet_s`."""
    seen: list[int | None] = []
    fields: dict[str, str] = {}
    with contextlib.suppress(TimeoutError):
        while True:
            async with asyncio.timeout(quiet_s):
                line = (await stream.content.readline()).decode().rstrip("\n")
            if line:
                name, _, value = line.partition(":")
                if name:
                    fields[name] = value.removeprefix(" ")
            elif fields:
                if fields.get("event") == "batch":
                    seen.append(offset_of(fields["data"]))
                fields = {}
    return seen
