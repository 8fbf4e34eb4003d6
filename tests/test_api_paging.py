"""The list endpoint's guarantees: newest first, `limit` exact, no skip or repeat while batches
are being created concurrently, opaque tokens bound to their pipeline."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core import keys
from core.settings import Settings
from core.store import BatchStore
from tests.helpers import AUTH, api_client, api_settings, spec, spec_body

Client = TestClient[Any, Any]


async def _post_many(api: Client, pipeline: str, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        response = await api.post(f"/api/v1/batches/{pipeline}", headers=AUTH)
        assert response.status == 200
        ids.append((await response.json())["item"])
    return ids


async def test_paging_250_batches_at_limit_7_while_50_more_are_created(topics: Settings,
                                                                        redis: Redis) -> None:
    async with api_client(api_settings(topics)) as api:
        assert (await api.put("/api/v1/pipelines/p", json=spec_body(), headers=AUTH)).status == 201
        existing = await _post_many(api, "p", 250)

        seen: list[str] = []
        pages = 0
        token: str | None = None
        writer = asyncio.create_task(_post_many(api, "p", 50))
        while True:
            params = {"limit": "7", **({"token": token} if token else {})}
            response = await api.get("/api/v1/batches/p/", params=params, headers=AUTH)
            assert response.status == 200
            body = await response.json()
            assert len(body["items"]) <= 7
            for batch_id, batch in body["items"].items():
                assert batch["id"] == batch_id and batch["state"]["state"] == "pending"
            seen.extend(body["items"])
            pages += 1
            token = body["token"]
            if token is None:
                break
            await asyncio.sleep(0)  # let the writer interleave between pages
        created_during = await writer

    assert len(seen) == len(set(seen)), "a batch was repeated"
    # The first page may already include batches created after paging began; after it, the
    # pages continue strictly below, so every earlier batch appears exactly once.
    assert set(existing) <= set(seen), "a batch was skipped"
    assert set(seen) - set(existing) <= set(created_during)
    # Newest first by creation: each task's POSTs ran one after the other, the writer's after
    # all of `existing`. (Not by sorting the ids: an id orders by its millisecond only, and
    # two POSTs within one millisecond sort by their random part.)
    created = [*existing, *created_during]
    assert seen == [b for b in reversed(created) if b in set(seen)], "not newest first"
    assert pages >= 250 // 7


async def test_limit_is_exact_and_the_last_page_has_a_null_token(topics: Settings, redis: Redis) -> None:
    async with api_client(api_settings(topics)) as api:
        await api.put("/api/v1/pipelines/p", json=spec_body(), headers=AUTH)
        ids = await _post_many(api, "p", 5)
        body = await (await api.get("/api/v1/batches/p/?limit=5", headers=AUTH)).json()
        assert list(body["items"]) == ids[::-1] and body["token"] is None
        body = await (await api.get("/api/v1/batches/p/?limit=2", headers=AUTH)).json()
        assert list(body["items"]) == ids[:-3:-1] and body["token"]
        body = await (await api.get("/api/v1/batches/p/", headers=AUTH)).json()
        assert len(body["items"]) == 5 and body["token"] is None


async def test_tokens_are_bound_to_their_pipeline_and_signed(topics: Settings, redis: Redis) -> None:
    async with api_client(api_settings(topics)) as api:
        for pipeline in ("p", "q"):
            await api.put(f"/api/v1/pipelines/{pipeline}", json=spec_body(), headers=AUTH)
            await _post_many(api, pipeline, 3)
        token = (await (await api.get("/api/v1/batches/p/?limit=1", headers=AUTH)).json())["token"]
        foreign = await api.get("/api/v1/batches/q/", params={"token": token}, headers=AUTH)
        assert foreign.status == 400
        assert "another pipeline" in (await foreign.json())["error"]["message"]
        body, signature = token.split(".")
        forged = await api.get("/api/v1/batches/p/", params={"token": body + "." + signature[::-1]},
                               headers=AUTH)
        assert forged.status == 400
        ok = await api.get("/api/v1/batches/p/", params={"token": token}, headers=AUTH)
        assert ok.status == 200 and len((await ok.json())["items"]) == 2


async def test_an_empty_token_is_refused_not_taken_for_the_first_page(
        topics: Settings, redis: Redis) -> None:
    """A client that sends its null token as `token=` after the last page would otherwise
    be given the first page again as if it were the next, and list the batches for ever."""
    async with api_client(api_settings(topics)) as api:
        await api.put("/api/v1/pipelines/p", json=spec_body(), headers=AUTH)
        await _post_many(api, "p", 2)
        for headers in (AUTH, {**AUTH, "Accept": "text/event-stream"}):
            empty = await api.get("/api/v1/batches/p/?limit=1&token=", headers=headers)
            assert empty.status == 400, await empty.text()
            error = (await empty.json())["error"]
            assert error["code"] == "bad_request" and "token" in error["message"]


async def test_the_list_of_an_unknown_pipeline_is_a_404(topics: Settings, redis: Redis) -> None:
    """As `latest` answers for it: the list, its filters and its push stream say 404 for a
    pipeline never registered and without a batch, and write nothing for it."""
    unknown = "never-registered"
    async with api_client(api_settings(topics)) as api:
        assert (await api.get(f"/api/v1/batches/{unknown}", headers=AUTH)).status == 404
        for query in ("", "?limit=5", "?state=running", "?state=running&outcome=failed",
                      "?created_after=2026-01-01T00:00:00Z"):
            listed = await api.get(f"/api/v1/batches/{unknown}/{query}", headers=AUTH)
            assert listed.status == 404, (query, await listed.text())
            error = (await listed.json())["error"]
            assert error["code"] == "not_found" and unknown in error["message"], query
        stream = await api.get(f"/api/v1/batches/{unknown}/",
                               headers={**AUTH, "Accept": "text/event-stream"})
        assert stream.status == 404
        assert (await stream.json())["error"]["code"] == "not_found"
        # Registered without a batch yet: an empty list, as before.
        assert (await api.put("/api/v1/pipelines/q", json=spec_body(), headers=AUTH)).status == 201
        empty = await api.get("/api/v1/batches/q/?state=running", headers=AUTH)
        assert (empty.status, await empty.json()) == (200, {"items": {}, "token": None})
        # Holding a batch though never registered (as `latest` finds it): listed, filters too.
        store = BatchStore.from_settings(redis, topics)
        await store.create("unregistered", "b1", spec())
        page = await (await api.get("/api/v1/batches/unregistered/", headers=AUTH)).json()
        assert list(page["items"]) == ["b1"]
        filtered = await api.get("/api/v1/batches/unregistered/?state=running", headers=AUTH)
        assert (filtered.status, await filtered.json()) == (200, {"items": {}, "token": None})
    for key in (keys.pipeline_order(unknown), keys.batch_index(unknown),
                keys.batch_indexes_built(unknown)):
        assert await redis.exists(key) == 0, key
