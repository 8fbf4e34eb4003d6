"""A pipeline stream after its change feed was lost and back (service.pipeline_stream): what
changed meanwhile reaches the client, on the first page or beyond it, and nothing else."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse
from redis.asyncio import Redis

from core import keys
from core.codec import Event
from core.models import new_batch_id
from core.settings import Settings
from service import pipeline_stream
from service.waiters import READ
from tests.cache_support import cache_of, cached_api, direct_store, engines, proxied
from tests.conftest import eventually
from tests.helpers import spec
from tests.tcp_proxy import TcpProxy, sent
from tests.test_api_streams import SSE, next_event


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    yield from engines("redis")


async def _feed_lost_and_back(proxy: TcpProxy, api: Any) -> None:
    """Blackholes the cache's subscription until the cache knows its feed is lost, then
    lets it through again until it is live."""
    cache = cache_of(api)
    await eventually(lambda: not cache.live, timeout=10)
    proxy.forward()
    await eventually(lambda: cache.live, timeout=10)


async def _until_running(response: ClientResponse,
                         batch_id: str) -> list[tuple[str, dict[str, Any]]]:
    """The events until `batch_id` is sent `running` (a change made once the feed is back:
    by then the stream has sent what its reset gave)."""
    events: list[tuple[str, dict[str, Any]]] = []
    while not any(name == "batch" and data["id"] == batch_id
                  and data["state"]["state"] == "running" for name, data in events):
        got = await next_event(response, timeout=15)
        assert got, events
        if "event" in got:
            events.append((got["event"], orjson.loads(got["data"])))
    return events


async def test_a_pipeline_stream_announces_a_batch_deleted_while_its_feed_was_down(
        test_settings: Settings, redis: Redis) -> None:
    """After the cache's feed is lost and back the stream sends its page again; a batch it
    had sent that was deleted meanwhile is announced `deleted`, as a delete is (the page
    alone would leave it in the client's view for ever), and one that only fell off the
    page (newer ones came) is not, nor sent again (it did not change)."""
    pipeline = f"streams-{uuid.uuid4().hex[:8]}"
    store = direct_store(redis, test_settings)  # another process: not through the proxy
    created = []
    for _ in range(3):
        batch_id = new_batch_id()
        await store.create(pipeline, batch_id, spec())
        created.append(batch_id)
    async with proxied(test_settings) as (proxy, through), cached_api(through) as api:
        response = await api.get(f"/api/v1/batches/{pipeline}/", headers=SSE,
                                 params={"limit": "2"})
        assert response.status == 200
        firsts = [orjson.loads((await next_event(response))["data"])["id"] for _ in range(2)]
        assert firsts == created[:0:-1]
        proxy.blackhole(sent(b"SUBSCRIBE"), sticky=True)  # the feed goes silent
        await store.hide(pipeline, created[2])  # deleted meanwhile by another API process
        newer = [new_batch_id() for _ in range(2)]  # and created[1] falls off the page
        for batch_id in newer:
            await store.create(pipeline, batch_id, spec())
        await _feed_lost_and_back(proxy, api)
        await store.apply([Event("batch.state", newer[1], pipeline, state="running")])
        events = await _until_running(response, newer[1])
        response.close()
        deleted = [data["id"] for name, data in events if name == "deleted"]
        assert deleted == [created[2]], events
        assert {data["id"] for name, data in events if name == "batch"} == set(newer), events


async def test_a_pipeline_stream_resends_an_off_page_batch_that_changed_while_its_feed_was_down(
        test_settings: Settings, redis: Redis) -> None:
    """The stream sends every change of any batch of the pipeline, those beyond its first
    page too. After a reset it sent the page again (and `deleted`): a batch it had sent, off
    the page, that changed meanwhile was never sent again, and the client showed it
    `running` for good although it had stopped (no later change comes to a stopped batch)."""
    pipeline = f"streams-{uuid.uuid4().hex[:8]}"
    store = direct_store(redis, test_settings)  # another process: not through the proxy
    older, newest = new_batch_id(), new_batch_id()
    await store.create(pipeline, older, spec())
    await store.create(pipeline, newest, spec())
    async with proxied(test_settings) as (proxy, through), cached_api(through) as api:
        response = await api.get(f"/api/v1/batches/{pipeline}/", headers=SSE,
                                 params={"limit": "1"})
        assert response.status == 200
        assert orjson.loads((await next_event(response))["data"])["id"] == newest
        # The older batch (off the page) starts: the stream sends it, as every change.
        await store.apply([Event("batch.state", older, pipeline, state="running",
                                 event_id="r1")])
        running = orjson.loads((await next_event(response))["data"])
        assert (running["id"], running["state"]["state"]) == (older, "running")
        proxy.blackhole(sent(b"SUBSCRIBE"), sticky=True)  # the feed goes silent
        await store.apply([Event("batch.state", older, pipeline, state="stop",
                                 outcome="completed", event_id="s1", ts=1_760_000_000.0)])
        await _feed_lost_and_back(proxy, api)
        await store.apply([Event("batch.state", newest, pipeline, state="running",
                                 event_id="r2")])
        events = await _until_running(response, newest)
        response.close()
    # As GET says: stopped. Sent once (it changed once), the page's unchanged batch not again.
    assert [(data["id"], data["state"]["state"]) for name, data in events
            if name == "batch"] == [(older, "stop"), (newest, "running")], events


async def test_a_reset_keeps_the_changes_the_feed_delivered_beside_it(
        test_settings: Settings, redis: Redis) -> None:
    # A change of a batch never sent, beyond the page, taken with the reset: the reset's
    # reads do not cover it (not on the page, not sent), so dropping it lost the change.
    pipeline = f"streams-{uuid.uuid4().hex[:8]}"
    store = direct_store(redis, test_settings)
    ids = [new_batch_id() for _ in range(3)]
    for batch_id in ids:
        await store.create(pipeline, batch_id, spec())
    key = keys.batch(pipeline, ids[0])
    changed = await pipeline_stream._after_reset(store, pipeline, 1, {}, [(key, READ)])
    assert changed == [(keys.batch(pipeline, ids[2]), READ), (key, READ)]


async def test_the_reset_check_finds_the_deleted_and_the_changed_in_chunks(
        test_settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = f"streams-{uuid.uuid4().hex[:8]}"
    store = direct_store(redis, test_settings)
    ids = [new_batch_id() for _ in range(5)]
    for batch_id in ids:
        await store.create(pipeline, batch_id, spec())
    # ids[4] was sent running: its rev is the one sent, but it may have gone stalled since.
    await store.apply([Event("batch.state", ids[4], pipeline, state="running")])
    sent = {b: (int((await store.fields(pipeline, b) or {})["rev"]), "") for b in ids}
    await store.hide(pipeline, ids[0])
    await store.apply([Event("batch.state", ids[1], pipeline, state="running")])
    # A rebuild restored a lower rev than the one sent: Redis is the truth.
    sent[ids[2]] = (sent[ids[2]][0] + 5, "")
    monkeypatch.setattr(pipeline_stream, "CHECK_CHUNK", 2)  # two calls
    assert await pipeline_stream._changed_meanwhile(redis, pipeline, sent, {ids[3]: {}}) == (
        [ids[0]], [ids[1], ids[2]], [ids[4]])


async def test_the_backstops_check_covers_the_most_recent_batches_a_reset_all(
        test_settings: Settings, redis: Redis) -> None:
    """Every open stream's backstop ran the whole check (up to 10,000 batches sent, some
    23 ms a stream) every cache.ttl_s; it now checks the most recent it sent, and a real reset
    of the feed all of them."""
    pipeline = f"streams-{uuid.uuid4().hex[:8]}"
    store = direct_store(redis, test_settings)
    ids = [new_batch_id() for _ in range(3)]
    for batch_id in ids:
        await store.create(pipeline, batch_id, spec())
    # oldest first
    sent = {b: (int((await store.fields(pipeline, b) or {})["rev"]), "") for b in ids}
    for batch_id in ids[:2]:
        await store.apply([Event("batch.state", batch_id, pipeline, state="running")])

    async def checked(depth: int) -> list[str]:
        changed = await pipeline_stream._after_reset(store, pipeline, 1, sent, [], depth)
        return [key for key, _ in changed if key != keys.batch(pipeline, ids[2])]

    assert await checked(1) == []  # the most recent sent is the page's (ids[2])
    assert await checked(2) == [keys.batch(pipeline, ids[1])]
    assert await checked(pipeline_stream.MAX_SENT) == [keys.batch(pipeline, b) for b in ids[:2]]
