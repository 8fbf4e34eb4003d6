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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from core.settings import ROOT, Settings
from tests.cache_support import PIPELINE, direct_store, engines, new_batches, set_offset
from tests.conftest import eventually, free_port
from tests.helpers import AUTH, STATIC_TOKEN
from tests.lagging_feed import LaggingFeedProxy, lagging_feed

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


async def _held_polls(session: aiohttp.ClientSession, url: str) -> bool:
    """Whether the process at `url` holds a long-poll now."""
    async with session.get(f"{url}/metrics", headers=AUTH) as response:
        text = await response.text()
    return any(line.startswith('dhub_open_streams{kind="long_poll"}')
               and float(line.rsplit(" ", 1)[-1]) > 0 for line in text.splitlines())


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
                return  # read from Redis or the cache: held by the cache either way
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


@contextlib.asynccontextmanager
async def _b_behind_a(test_settings: Settings, redis: Redis) -> AsyncIterator[
        tuple[str, str, aiohttp.ClientSession, str, Callable[[int], Awaitable[None]]]]:
    """A batch at offset 1 in B's cache, then offset 2 answered by A (B's feed has not
    delivered it): B's address, the batch's path, a session, A's ETag of offset 2, and how
    to write a later offset."""
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    path = f"/api/v1/batches/{PIPELINE}/{target}"
    await set_offset(store, target, 1)

    async def bump(offset: int) -> None:
        await set_offset(store, target, offset)

    async with two_apis(test_settings) as (a, b), aiohttp.ClientSession() as session:
        await _b_caches(session, b, path, 1)
        yield b, path, session, await _newer_on_a(session, a, path, store, target), bump


@pytest.mark.parametrize("params", [{"wait": "2"}, {}], ids=["long-poll", "conditional-get"])
async def test_a_request_on_b_naming_a_newer_etag_from_a_never_answers_older(
        test_settings: Settings, redis: Redis, params: dict[str, str]) -> None:
    async with _b_behind_a(test_settings, redis) as (b, path, session, etag, _):
        answer = await session.get(b + path, params=params,
                                   headers={**AUTH, "If-None-Match": etag})
        body = await answer.read()
        status = answer.status
        answer.close()
    assert status == 304 or offset_of(body) == 2, \
        f"B answered {status} with offset {offset_of(body)} after A's offset 2"


async def test_a_long_poll_on_b_holding_a_newer_etag_from_a_wakes_with_the_next_change(
        test_settings: Settings, redis: Redis) -> None:
    async with _b_behind_a(test_settings, redis) as (b, path, session, etag, bump):

        async def change_later() -> None:
            with contextlib.suppress(AssertionError):  # not held: the answer says what
                await eventually(lambda: _held_polls(session, b), timeout=5)
            await bump(3)

        changer = asyncio.create_task(change_later())
        async with session.get(b + path, params={"wait": "10"},
                               headers={**AUTH, "If-None-Match": etag}) as held:
            body = await held.read()
            status = held.status
        await changer
    assert (status, offset_of(body) if status == 200 else None) == (200, 3), \
        f"B's long-poll held on A's offset 2 answered {status} ({body[:60]!r})"


async def test_a_stream_resumed_on_b_with_a_last_event_id_from_a_sends_no_older_nor_a_repeat(
        test_settings: Settings, redis: Redis) -> None:
    async with _b_behind_a(test_settings, redis) as (b, path, session, etag, bump), \
            session.get(b + path, headers={**SSE, "Last-Event-ID": etag}) as stream:
        assert stream.status == 200
        seen = await _batch_offsets(stream, LAG_S * 3)
        await bump(3)
        seen += await _batch_offsets(stream, LAG_S * 3)
    assert seen == [3], f"B's stream, resumed after A's offset 2, sent offsets {seen}"


async def _batch_datas(stream: aiohttp.ClientResponse, quiet_s: float) -> list[str]:
    """The data of the `batch` events the stream sends until it is quiet for `quiet_s`."""
    datas: list[str] = []
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
                    datas.append(fields["data"])
                fields = {}
    return datas


async def _batch_offsets(stream: aiohttp.ClientResponse, quiet_s: float) -> list[int | None]:
    return [offset_of(data) for data in await _batch_datas(stream, quiet_s)]


# -- a feed lagging longer than the silence bound, with traffic flowing ------------------
SILENCE_S = 2.5  # the default DHUB_CACHE_SILENCE_S the processes run with
LONG_LAG_S = 4.5


@contextlib.asynccontextmanager
async def lag_later(settings: Settings) -> AsyncIterator[tuple[LaggingFeedProxy, Settings]]:
    """A LaggingFeedProxy with no lag yet (the process subscribes within its bound first)."""
    url = urlsplit(settings.redis_url)
    async with LaggingFeedProxy(url.hostname or "127.0.0.1", url.port or 6379, 0.0) as proxy:
        yield proxy, settings.model_copy(
            update={"redis_url": f"redis://127.0.0.1:{proxy.port}{url.path}"})


async def _traffic(store: Any, other: str) -> None:
    """Changes of another batch every 0.3 s: B's feed is never quiet, only late."""
    offset = 0
    while True:
        offset += 1
        await set_offset(store, other, offset)
        await asyncio.sleep(0.3)


async def _until_b_shows(session: aiohttp.ClientSession, url: str,
                         shown: Callable[[int, bytes], bool], limit_s: float) -> float:
    """Seconds until GET `url` on B answers as `shown` says (polled every 50 ms)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < limit_s:
        async with session.get(url, headers=AUTH) as response:
            if shown(response.status, await response.read()):
                break
        await asyncio.sleep(0.05)
    return loop.time() - start


async def test_process_b_whose_feed_lags_past_the_silence_bound_under_traffic_stops_serving_its_cache(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    target, gone, other = await new_batches(store, 3)
    path = f"/api/v1/batches/{PIPELINE}/"
    await set_offset(store, target, 1)
    async with lag_later(test_settings) as (proxy, lagging), \
            api_process(test_settings) as a, api_process(lagging) as b, \
            aiohttp.ClientSession() as session:
        await _b_caches(session, b, path + target, 1)
        async with session.get(b + path + gone, headers=AUTH) as response:
            assert response.status == 200
        traffic = asyncio.create_task(_traffic(store, other))
        try:
            # The lag grows as a backlog does (a step at once would be a silence of its own).
            while proxy.lag_s < LONG_LAG_S:
                proxy.lag_s += 0.08
                await asyncio.sleep(0.1)
            await set_offset(store, target, 2)
            await store.hide(PIPELINE, gone)
            async with session.get(a + path + target, headers=AUTH) as response:
                assert offset_of(await response.read()) == 2
            async with session.get(a + path + gone, headers=AUTH) as response:
                assert response.status == 404
            changed, deleted = await asyncio.gather(
                _until_b_shows(session, b + path + target,
                               lambda status, body: status == 200 and offset_of(body) == 2,
                               LONG_LAG_S + 2),
                _until_b_shows(session, b + path + gone,
                               lambda status, _: status == 404, LONG_LAG_S + 2))
        finally:
            traffic.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await traffic
    # The documented bound of a silent feed (silence_s + a tick), with room for a busy machine.
    assert changed < SILENCE_S + 0.7, f"B answered offset 1 for {changed:.2f}s after A's 2"
    assert deleted < SILENCE_S + 0.7, f"B answered a deleted batch for {deleted:.2f}s"


async def test_a_pipeline_stream_opened_on_b_after_a_newer_answer_from_a_sends_no_older_batch(
        test_settings: Settings, redis: Redis) -> None:
    """A batch beyond the stream's first page: the stream has sent none of it, so only a read
    of Redis can order the feed's (late) versions of it after what A answered."""
    store = direct_store(redis, test_settings)
    target, _newer = await new_batches(store, 2)  # the newer one alone on a page of 1
    async with two_apis(test_settings) as (a, b), aiohttp.ClientSession() as session:
        await set_offset(store, target, 1)
        await set_offset(store, target, 2)  # both messages still on their way to B
        async with session.get(f"{a}/api/v1/batches/{PIPELINE}/{target}",
                               headers=AUTH) as response:
            assert offset_of(await response.read()) == 2
        async with session.get(f"{b}/api/v1/batches/{PIPELINE}/", params={"limit": "1"},
                               headers=SSE) as stream:
            assert stream.status == 200
            seen = await _batch_ids_offsets(stream, LAG_S * 3)
    assert [offset for batch_id, offset in seen if batch_id == target] in ([], [2]), \
        f"B's pipeline stream, opened after A answered offset 2, sent {seen}"


async def _batch_ids_offsets(stream: aiohttp.ClientResponse,
                             quiet_s: float) -> list[tuple[str, int | None]]:
    return [(orjson.loads(data)["id"], offset_of(data))
            for data in await _batch_datas(stream, quiet_s)]
