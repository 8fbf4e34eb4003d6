"""Bearer auth: static tokens and JWTs (HS256, RS256) with scopes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core.settings import Settings
from tests.helpers import AUTH, api_client, api_settings, bearer, hs_token, rs_token, spec_body

Client = TestClient[Any, Any]


@pytest.fixture
async def api(topics: Settings, redis: Redis) -> AsyncIterator[Client]:
    async with api_client(api_settings(topics)) as client:
        assert (await client.put("/api/v1/pipelines/p", json=spec_body(), headers=AUTH)).status == 201
        yield client


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer"}, {"Authorization": "Basic abc"},
    {"Authorization": "Bearer wrong-token"}, bearer(hs_token("batches:read", ttl=-60)),
    bearer(jwt.encode({"scope": "batches:read"}, "another-secret-of-enough-length-0123456789",
                      algorithm="HS256")),
    bearer(jwt.encode({"scope": "batches:read"}, "", algorithm="none")),
])
async def test_without_a_valid_token_401(api: Client, headers: dict[str, str]) -> None:
    response = await api.get("/api/v1/batches/p/", headers=headers)
    assert response.status == 401
    assert (await response.json())["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("make", [hs_token, rs_token])
async def test_jwt_scopes(api: Client, make: Any) -> None:
    reader = bearer(make("batches:read"))
    writer = bearer(make("batches:read", "batches:write"))
    admin = bearer(make("pipelines:write"))
    assert (await api.get("/api/v1/batches/p/", headers=reader)).status == 200
    assert (await api.get("/api/v1/pipelines/p", headers=reader)).status == 200
    denied = await api.post("/api/v1/batches/p", headers=reader)
    assert denied.status == 403 and (await denied.json())["error"]["code"] == "forbidden"
    created = await api.post("/api/v1/batches/p", headers=writer)
    assert created.status == 200
    batch_id = (await created.json())["item"]
    assert (await api.put(f"/api/v1/batches/p/{batch_id}/stop", headers=reader)).status == 403
    assert (await api.delete(f"/api/v1/batches/p/{batch_id}", headers=reader)).status == 403
    assert (await api.put(f"/api/v1/batches/p/{batch_id}/stop", headers=writer)).status == 200
    body = spec_body(version="2")
    assert (await api.put("/api/v1/pipelines/p", json=body, headers=writer)).status == 403
    assert (await api.put("/api/v1/pipelines/p", json=body, headers=admin)).status == 201
    assert (await api.get("/api/v1/batches/p/", headers=admin)).status == 403


async def test_several_static_tokens(topics: Settings, redis: Redis) -> None:
    settings = api_settings(topics)
    settings = settings.model_copy(update={"api_tokens": Settings(api_tokens="one-token,two-token").api_tokens})
    async with api_client(settings) as api:
        for token in ("one-token", "two-token"):
            assert (await api.get("/api/v1/pipelines/", headers=bearer(token))).status == 200
        assert (await api.get("/api/v1/pipelines/", headers=bearer("three-token"))).status == 401


async def test_health_and_docs_need_no_token(api: Client) -> None:
    assert (await api.get("/healthz")).status == 200
    ready = await api.get("/readyz")
    assert ready.status == 200 and (await ready.json())["checks"] == {"redis": True, "kafka": True}
    assert (await api.get("/api/v1/openapi.json")).status == 200
    assert (await api.get("/docs")).status == 200
