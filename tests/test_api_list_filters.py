"""The list's filters through the API: `state`, `outcome`, `created_after`, `created_before`,
with `limit` and `token` under the unfiltered list's guarantees (newest first, nothing
skipped or repeated while batches are created or change state), tokens bound to their
filter, a clear 400 for anything else, and batches from before the indexes found."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any
from unittest.mock import ANY

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core import keys
from core.codec import Event
from core.scripts import Scripts
from core.settings import Settings
from core.store import BatchStore
from tests.helpers import AUTH, api_client, api_settings, spec

Client = TestClient[Any, Any]
P = "p"
T0 = 1_760_000_000.0


@pytest.fixture
def store(redis: Redis) -> BatchStore:
    return BatchStore(redis, Scripts(redis), token_secret=b"unused")


async def make(store: BatchStore, n: int, start: int = 0) -> list[str]:
    """n batches, named in creation order (so newest first is reverse name order)."""
    ids = [f"b{k:04d}" for k in range(start, start + n)]
    for batch_id in ids:
        await store.create(P, batch_id, spec())
    return ids


async def to(store: BatchStore, ids: list[str], state: str, outcome: str = "completed") -> None:
    await store.apply([Event("batch.state", b, P, state=state, ts=T0,
                             outcome=outcome if state == "stop" else None) for b in ids])


async def get(api: Client, **params: str) -> tuple[int, dict[str, Any]]:
    response = await api.get(f"/api/v1/batches/{P}/", params=params, headers=AUTH)
    return response.status, await response.json()


async def every(api: Client, limit: int = 4, **params: str) -> list[str]:
    """Every page of a list, its ids in order (checking each page's limit)."""
    seen: list[str] = []
    token: str | None = None
    while True:
        status, body = await get(api, limit=str(limit), **params, **({"token": token} if token else {}))
        assert status == 200, body
        assert len(body["items"]) <= limit
        seen += body["items"]
        token = body["token"]
        if token is None:
            return seen


async def test_each_filter_gives_exactly_its_batches_newest_first(
        topics: Settings, redis: Redis, store: BatchStore) -> None:
    ids = await make(store, 16)
    await to(store, ids[0:3], "scheduled")
    await to(store, ids[3:7], "running")
    await to(store, ids[7:9], "stop", "failed")
    await to(store, ids[9:12], "stop", "cancelled")
    await to(store, ids[12:13], "stop", "completed")
    async with api_client(api_settings(topics)) as api:
        everything = await every(api)
        assert everything == ids[::-1]
        assert await every(api, state="pending") == ids[13:][::-1]
        assert await every(api, state="scheduled") == ids[0:3][::-1]
        assert await every(api, limit=1, state="running") == ids[3:7][::-1]
        assert await every(api, state="stop") == ids[7:13][::-1]
        assert await every(api, outcome="cancelled") == ids[9:12][::-1]
        assert await every(api, state="stop", outcome="failed") == ids[7:9][::-1]
        # Only a stopped batch has an outcome: nothing, at once, without a token.
        assert await get(api, state="running", outcome="failed") == (200, {"items": {},
                                                                           "token": None})
        _, body = await get(api, limit="100")
        created = {b: datetime.fromisoformat(v["created_at"]) for b, v in body["items"].items()}
        # Windows cut at a batch's own creation time (several may share a millisecond):
        # at or after `created_after`, strictly before `created_before`.
        for cut in (ids[0], ids[5], ids[15]):
            at = created[cut]
            after = [b for b in everything if created[b] >= at]
            before = [b for b in everything if created[b] < at]
            assert await every(api, created_after=at.isoformat()) == after
            assert await every(api, created_before=at.isoformat()) == before
            # the same instant in another timezone, and a microsecond above it
            other = at.astimezone(datetime.fromisoformat("2030-01-01T00:00:00+05:30").tzinfo)
            assert await every(api, created_after=other.isoformat()) == after
            assert await every(api, created_after=(at + timedelta(microseconds=1)).isoformat()) == [
                b for b in everything if created[b] > at]
        lo, hi = created[ids[2]], created[ids[11]]
        window = [b for b in everything if lo <= created[b] < hi]
        assert await every(api, limit=2, created_after=lo.isoformat(),
                           created_before=hi.isoformat()) == window
        assert await every(api, state="stop", created_after=lo.isoformat(),
                           created_before=hi.isoformat()) == [
            b for b in window if b in ids[7:13]]


async def test_paging_running_while_batches_start_stop_and_are_created(
        topics: Settings, redis: Redis, store: BatchStore) -> None:
    """A batch that stops while the client pages `state=running` may drop out; no other
    batch is skipped or repeated, and every batch a page shows was running when read."""
    ids = await make(store, 60)
    running = ids[::2]  # 30 running, 30 pending, interleaved
    await to(store, running, "running")
    pending = [b for b in ids if b not in running]
    stopped: set[str] = set()
    started: set[str] = set()
    created = 60
    seen: list[str] = []
    async with api_client(api_settings(topics)) as api:
        token: str | None = None
        while True:
            status, body = await get(api, state="running", limit="3",
                                     **({"token": token} if token else {}))
            assert status == 200
            for batch in body["items"].values():
                assert batch["state"]["state"] == "running"
            seen += body["items"]
            token = body["token"]
            if token is None:
                break
            # Between pages: a batch stops below the cursor and one above it, a pending one
            # below the cursor starts, and new batches are created and started.
            cursor = seen[-1]
            below = [b for b in running if b < cursor and b not in stopped]
            for victim in (below[-1:] if len(below) > 2 else []) + [seen[0]]:
                await to(store, [victim], "stop", "cancelled")
                stopped.add(victim)
            waiting = [b for b in pending if b < cursor and b not in started]
            if waiting:
                await to(store, waiting[:1], "running")
                started.add(waiting[0])
            fresh = await make(store, 2, start=created)
            created += 2
            await to(store, fresh, "running")
    assert len(seen) == len(set(seen)), "a batch was repeated"
    assert seen == sorted(seen, reverse=True), "not newest first"
    assert set(running) - stopped <= set(seen), "a batch that stayed running was skipped"
    assert set(seen) <= set(running) | started
    assert stopped - set(seen), "the test stopped nothing still ahead"
    assert started & set(seen), "the test started nothing still ahead"


async def test_tokens_are_bound_to_their_filter(topics: Settings, redis: Redis,
                                                store: BatchStore) -> None:
    ids = await make(store, 6)
    await to(store, ids, "running")
    async with api_client(api_settings(topics)) as api:
        _, body = await get(api, limit="2", state="running")
        token = body["token"]
        for other in ({"state": "pending"}, {}, {"state": "running", "outcome": "failed"},
                      {"state": "running", "created_after": "2000-01-01T00:00:00Z"}):
            status, error = await get(api, token=token, **other)
            assert status == 400, other
            assert "another filter" in error["error"]["message"]
        status, body = await get(api, limit="2", state="running", token=token)
        assert status == 200 and list(body["items"]) == ids[3:1:-1]
        # An unfiltered list's token is refused with a filter; the same instant written
        # otherwise is the same filter.
        _, body = await get(api, limit="2")
        assert (await get(api, token=body["token"], state="running"))[0] == 400
        _, body = await get(api, limit="2", created_after="2000-01-01T00:00:00Z")
        status, body = await get(api, limit="2", created_after="2000-01-01T01:00:00+01:00",
                                 token=body["token"])
        assert status == 200 and list(body["items"]) == ids[3:1:-1]


@pytest.mark.parametrize(("query", "says"), [
    ("state=stopped", "state must be one of pending, scheduled, running, stop"),
    ("state=", "state must be one of"),
    ("outcome=ok", "outcome must be one of completed, failed, cancelled, crashed"),
    ("created_after=yesterday", "created_after must be an ISO-8601 time"),
    ("created_before=2030-01-01T00:00:00", "created_before must include a timezone"),
    ("created_after=2030-01-01T00:00:00+01:00", "%2B"),  # '+' unencoded: a space
    ("created_after=2030-01-02T00:00:00Z&created_before=2030-01-01T00:00:00Z",
     "created_after must be earlier than created_before"),
    ("created_after=9999-12-31T23:59:59-01:00", "created_after is out of range"),
    ("state=running&state=stop", "state is given more than once"),
    # Not the first taken silently: `limit=1&limit=1000` paged one at a time.
    ("limit=1&limit=1000", "limit is given more than once"),
    ("token=a.b&token=c.d", "token is given more than once"),
])
async def test_invalid_filters_are_a_400_saying_what(topics: Settings, redis: Redis,
                                                      query: str, says: str) -> None:
    async with api_client(api_settings(topics)) as api:
        response = await api.get(f"/api/v1/batches/{P}/?{query}", headers=AUTH)
        assert response.status == 400
        body = await response.json()
        assert body["error"]["code"] == "bad_request"
        assert says in body["error"]["message"]


async def test_the_push_stream_refuses_filters_and_tokens(
        topics: Settings, redis: Redis, store: BatchStore) -> None:
    # The stream starts at the newest batches: a token, a forged one or the valid token of
    # the next page, was ignored, and a client paging with it got the first page again.
    await make(store, 3)
    sse = {**AUTH, "Accept": "text/event-stream"}
    async with api_client(api_settings(topics)) as api:
        response = await api.get(f"/api/v1/batches/{P}/?state=running", headers=sse)
        assert response.status == 400
        assert "not filtered" in (await response.json())["error"]["message"]
        _, first = await get(api, limit="1")
        for token in ("garbage", first["token"]):
            async with asyncio.timeout(10):
                response = await api.get(f"/api/v1/batches/{P}/", headers=sse,
                                         params={"limit": "1", "token": token})
                status, kind = response.status, response.content_type
                message = (await response.json())["error"]["message"] if status == 400 else ""
                response.close()
            assert (status, kind) == (400, "application/json"), token
            assert "send no token" in message


async def test_batches_from_before_the_indexes_are_found_once_backfilled(
        topics: Settings, redis: Redis, store: BatchStore) -> None:
    ids = await make(store, 5)
    await to(store, ids[1:3], "running")
    # As a database written before the indexes existed.
    await redis.delete(*keys.batch_filter_indexes(P))
    assert not await redis.exists(keys.batch_indexes_built(P))
    async with api_client(api_settings(topics)) as api:
        # Concurrent first pages share one backfill, each answered once it is done.
        pages = await asyncio.gather(*(get(api, state="running") for _ in range(4)))
        assert pages == [(200, {"items": {b: ANY for b in ids[2:0:-1]}, "token": None})] * 4
        assert [list(body["items"]) for _, body in pages] == [ids[2:0:-1]] * 4
        assert await redis.get(keys.batch_indexes_built(P)) == "1"
        assert await every(api, state="pending") == [ids[4], ids[3], ids[0]]
        _, body = await get(api)
        at = body["items"][ids[3]]["created_at"]
        assert await every(api, created_after=at) == [
            b for b in ids[::-1] if body["items"][b]["created_at"] >= at]
        # A pipeline with no batch leaves no marker behind (and, never registered, is a 404).
        response = await api.get("/api/v1/batches/nobody/?state=running", headers=AUTH)
        assert response.status == 404
        assert not await redis.exists(keys.batch_indexes_built("nobody"))
