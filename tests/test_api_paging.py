"""The list endpoint's guarantees: newest first, `limit` exact, no skip or repeat while batches
are being created concurrently, opaque tokens bound to their pipeline."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core.settings import Settings
from tests.helpers import AUTH, api_client, api_settings, spec_body

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
    assert seen == sorted(seen, reverse=True), "not newest first"
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
        empty = await (await api.get("/api/v1/batches/nobody/", headers=AUTH)).json()
        assert empty == {"items": {}, "token": None}


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
