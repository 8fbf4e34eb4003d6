"""The batch as a push stream (SSE) in the GET's shape, on the cache's one subscription."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core import keys
from core.codec import Event
from core.models import new_batch_id
from core.settings import Settings
from service import streams
from service.appkeys import WAITERS
from service.cache import BatchCache
from service.waiters import BatchFeed, PipelineWatch
from tests.cache_support import (
    PIPELINE,
    cache_of,
    cached_api,
    direct_store,
    engines,
    new_batches,
    set_offset,
)
from tests.conftest import eventually
from tests.helpers import AUTH, spec

SSE = {**AUTH, "Accept": "text/event-stream"}


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    yield from engines("redis")


async def next_event(response: ClientResponse, timeout: float = 5) -> dict[str, Any]:
    """The next event's fields (comment lines kept under "comments"); {} at the end."""
    fields: dict[str, Any] = {"comments": []}
    async with asyncio.timeout(timeout):
        while True:
            line = (await response.content.readline()).decode()
            if not line:
                return {}
            line = line.rstrip("\n")
            if not line:
                if set(fields) != {"comments"}:
                    return fields
                continue
            name, _, value = line.partition(":")
            if not name:
                fields["comments"].append(value.strip())
                if value.strip() == "keep-alive":
                    return fields
                continue
            fields[name] = value.removeprefix(" ")



async def _get(api: TestClient[Any, Any], batch_id: str) -> tuple[bytes, str]:
    response = await api.get(f"/api/v1/batches/{PIPELINE}/{batch_id}", headers=AUTH)
    return await response.read(), response.headers["ETag"]


async def test_a_stream_sends_the_batch_then_each_change_then_the_end(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    async with cached_api(test_settings) as api:
        body, etag = await _get(api, target)
        response = await api.get(f"/api/v1/batches/{PIPELINE}/{target}", headers=SSE)
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        first = await next_event(response)
        assert (first["event"], first["id"], first["data"].encode()) == ("batch", etag, body)
        await set_offset(store, target, 3)
        second = await next_event(response)
        assert second["event"] == "batch" and second["id"] != etag
        assert orjson.loads(second["data"])["state"]["steps"]["extract"]["offsets"] == {"0": 3}
        # Exactly what GET now answers.
        assert (second["data"].encode(), second["id"]) == await _get(api, target)
        await store.apply([Event("batch.state", target, PIPELINE, state="stop",
                                 outcome="completed")])
        last = await next_event(response)
        assert orjson.loads(last["data"])["state"]["state"] == "stop"
        assert (await next_event(response))["event"] == "end"
        assert await next_event(response) == {}  # closed
        await eventually(lambda: len(api.app[WAITERS]) == 0, timeout=5)


async def test_last_event_id_resumes_without_repeating(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    async with cached_api(test_settings) as api:
        _, etag = await _get(api, target)
        response = await api.get(f"/api/v1/batches/{PIPELINE}/{target}",
                                 headers={**SSE, "Last-Event-ID": etag})
        await eventually(lambda: len(api.app[WAITERS]) == 1, timeout=5)
        await set_offset(store, target, 9)
        event = await next_event(response)  # the change, not the state it already had
        assert orjson.loads(event["data"])["state"]["steps"]["extract"]["offsets"] == {"0": 9}
        response.close()


async def test_a_deleted_batch_ends_its_stream_and_an_unknown_one_is_a_404(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    async with cached_api(test_settings) as api:
        response = await api.get(f"/api/v1/batches/{PIPELINE}/{target}", headers=SSE)
        assert (await next_event(response))["event"] == "batch"
        await store.hide(PIPELINE, target)
        assert (await next_event(response))["event"] == "deleted"
        assert await next_event(response) == {}
        missing = await api.get(f"/api/v1/batches/{PIPELINE}/batch-none", headers=SSE)
        assert missing.status == 404
        assert (await missing.json())["error"]["code"] == "not_found"


async def test_many_streams_share_the_one_subscription(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    async with cached_api(test_settings) as api:
        [(_, before)] = await redis.pubsub_numsub(keys.CHANGES_CHANNEL)
        responses = [await api.get(f"/api/v1/batches/{PIPELINE}/{target}", headers=SSE)
                     for _ in range(50)]
        for response in responses:
            assert (await next_event(response))["event"] == "batch"
        [(_, during)] = await redis.pubsub_numsub(keys.CHANGES_CHANNEL)
        # The count is server-wide: the other test workers' APIs subscribe and leave meanwhile
        # (a few at most). A subscription per stream would add 50.
        assert during - before < len(responses) // 2
        await set_offset(store, target, 11)
        for response in responses:
            event = await next_event(response)
            assert orjson.loads(event["data"])["state"]["steps"]["extract"]["offsets"] == {"0": 11}
            response.close()


async def test_an_idle_stream_gets_keep_alive_comments(
        test_settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams, "KEEPALIVE_S", 0.2)
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    async with cached_api(test_settings) as api:
        response = await api.get(f"/api/v1/batches/{PIPELINE}/{target}", headers=SSE)
        assert (await next_event(response))["event"] == "batch"
        assert (await next_event(response, timeout=3))["comments"] == ["keep-alive"]
        response.close()


async def test_a_stream_learns_within_the_cache_ttl_of_a_change_made_without_a_message(
        test_settings: Settings, redis: Redis) -> None:
    """FLUSHDB (a forced rebuild, too, writes with no message): an open stream reads its
    batch again at least every cache.ttl_s, the GET cache's own backstop, while the feed is
    healthy and silent."""
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    async with cached_api(test_settings, cache=BatchCache(ttl_s=0.5)) as api:
        path = f"/api/v1/batches/{PIPELINE}/{target}"
        response = await api.get(path, headers=SSE)
        assert (await next_event(response))["event"] == "batch"
        await redis.flushdb()
        event = await next_event(response, timeout=3)
        while event.get("comments") == ["keep-alive"]:
            event = await next_event(response, timeout=3)
        response.close()
        assert cache_of(api).live
    assert event.get("event") == "deleted", f"the stream sent {event or 'nothing'}"


async def test_a_pipeline_stream_learns_within_the_cache_ttl_of_a_delete_without_a_message(
        test_settings: Settings, redis: Redis) -> None:
    pipeline = f"streams-{uuid.uuid4().hex[:8]}"
    store = direct_store(redis, test_settings)
    batch_id = new_batch_id()
    await store.create(pipeline, batch_id, spec())
    async with cached_api(test_settings, cache=BatchCache(ttl_s=0.5)) as api:
        response = await api.get(f"/api/v1/batches/{pipeline}/", headers=SSE)
        assert (await next_event(response))["event"] == "batch"
        await redis.flushdb()
        event = await next_event(response, timeout=3)
        response.close()
    assert (event.get("event"), orjson.loads(event.get("data", "{}"))) == (
        "deleted", {"id": batch_id}), f"the stream sent {event or 'nothing'}"


async def test_a_pipeline_stream_sends_the_newest_then_every_change(
        test_settings: Settings, redis: Redis) -> None:
    pipeline = f"streams-{uuid.uuid4().hex[:8]}"
    store = direct_store(redis, test_settings)
    created = []
    for _ in range(3):
        batch_id = new_batch_id()
        await store.create(pipeline, batch_id, spec())
        created.append(batch_id)
    async with cached_api(test_settings) as api:
        response = await api.get(f"/api/v1/batches/{pipeline}/", headers=SSE,
                                 params={"limit": "2"})
        assert response.status == 200
        firsts = [orjson.loads((await next_event(response))["data"])["id"] for _ in range(2)]
        assert firsts == created[:0:-1]  # the newest two, newest first
        await store.apply([Event("batch.state", created[0], pipeline, state="running")])
        changed = orjson.loads((await next_event(response))["data"])
        assert (changed["id"], changed["state"]["state"]) == (created[0], "running")
        newer = new_batch_id()
        await store.create(pipeline, newer, spec())  # seen at its creation
        arrived = orjson.loads((await next_event(response))["data"])
        assert (arrived["id"], arrived["state"]["state"]) == (newer, "pending")
        await store.hide(pipeline, created[1])
        await store.purge(pipeline, created[1])
        deleted = await next_event(response)
        assert (deleted["event"], orjson.loads(deleted["data"])) == ("deleted", {"id": created[1]})
        await store.apply([Event("batch.state", created[2], pipeline, state="running")])
        # The purge's own message did not announce the deletion twice.
        assert orjson.loads((await next_event(response))["data"])["id"] == created[2]
        response.close()
        await eventually(lambda: len(api.app[WAITERS]) == 0, timeout=5)


def test_a_pipeline_watch_that_falls_behind_is_marked_for_cut_off() -> None:
    async def run() -> None:
        watch = PipelineWatch(max_pending=2)
        for n in range(3):
            watch.add(f"k{n}", b"v")
        watch.add("k0", b"newer")  # a batch already pending takes its newer version
        assert watch.overflow and watch.take() == [("k0", b"newer"), ("k1", b"v")]
        watch.add(None)
        assert watch.everything and watch.wake.is_set()
        feed = BatchFeed(max_pending=2)
        for n in range(3):
            feed.add(b"%d" % n)
        assert feed.overflow and feed.take() == [b"0", b"1"]
    asyncio.run(run())


async def test_the_backstop_reads_of_different_batches_are_spread_over_the_period() -> None:
    """Every stream of a batch re-reads Redis at the same instant (one read for all of them),
    but the streams of 1,000 batches no longer all read at once every `cache.ttl_s`."""
    loop = asyncio.get_running_loop()
    now = loop.time()
    dues = [streams.backstop_due(10.0, keys.batch("p", f"batch-{n}")) for n in range(1_000)]
    after = loop.time()  # a slow machine takes a while over the thousand
    assert all(now < due <= after + 10.0 + 0.001 for due in dues)
    # The same batch, later: the same instants of the grid (a period on, if one passed).
    periods = (streams.backstop_due(10.0, keys.batch("p", "batch-7")) - dues[7]) / 10.0
    assert abs(periods - round(periods)) < 1e-6 and round(periods) in (0, 1)
    # In any second of the period, about a tenth of them (never all).
    per_second = [sum(1 for due in dues if now + s <= due < now + s + 1) for s in range(10)]
    assert max(per_second) < 200, per_second


async def test_a_stream_delivers_every_state_in_order_however_fast(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    async with cached_api(test_settings) as api:
        response = await api.get(f"/api/v1/batches/{PIPELINE}/{target}", headers=SSE)
        assert json_state(await next_event(response)) == "pending"
        # Back to back, faster than the stream's task runs between them.
        for state in ("scheduled", "running"):
            await store.apply([Event("batch.state", target, PIPELINE, state=state)])
        await store.apply([Event("batch.state", target, PIPELINE, state="stop",
                                 outcome="completed")])
        seen = [json_state(await next_event(response)) for _ in range(3)]
        assert seen == ["scheduled", "running", "stop"]
        assert (await next_event(response))["event"] == "end"


def json_state(event: dict[str, Any]) -> str:
    return str(orjson.loads(event["data"])["state"]["state"])


async def test_shutting_down_ends_open_streams_at_once(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    async with cached_api(test_settings) as api:
        streams_open = [await api.get(path, headers=SSE) for path in (
            f"/api/v1/batches/{PIPELINE}/{target}", f"/api/v1/batches/{PIPELINE}/")]
        for response in streams_open:
            assert (await next_event(response))["event"] == "batch"
        await api.app.shutdown()  # what the server runs first when it stops
        for response in streams_open:
            # Ended well before the next keep-alive (15 s) would have found out.
            assert await next_event(response, timeout=3) == {}


async def test_end_waits_for_the_outcome_a_later_stop_settles(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    async with cached_api(test_settings) as api:
        response = await api.get(f"/api/v1/batches/{PIPELINE}/{target}", headers=SSE)
        assert json_state(await next_event(response)) == "pending"
        await store.apply([Event("batch.state", target, PIPELINE, state="stop",
                                 outcome="cancelled", ts=1.0)])
        first_stop = orjson.loads((await next_event(response))["data"])
        assert first_stop["outcome"] == "cancelled"
        # The run's real end, stamped later, arrives after the cancel: it decides.
        await store.apply([Event("batch.state", target, PIPELINE, state="stop",
                                 outcome="completed", ts=2.0)])
        settled = await next_event(response)
        assert settled["event"] == "batch"
        assert orjson.loads(settled["data"])["outcome"] == "completed"
        assert (await next_event(response))["event"] == "end"
