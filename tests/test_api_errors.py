"""Failures at the edge: oversize bodies, dependency outages, unexpected errors, bad input."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from core import keys
from core.settings import Settings
from tests.helpers import AUTH, api_client, api_settings, spec_body


async def test_oversize_body_413(topics: Settings, redis: Redis) -> None:
    async with api_client(api_settings(topics, max_body_bytes=1024)) as api:
        body = spec_body()
        body["steps"][0]["config"] = {"blob": "x" * 4096}
        response = await api.put("/api/v1/pipelines/p", json=body, headers=AUTH)
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "payload_too_large"
        assert await redis.keys("*") == []


async def test_unexpected_error_500_with_request_id_and_no_trace(topics: Settings, redis: Redis,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    await redis.hset(keys.pipeline_versions("p"), "1", "{not json")
    await redis.rpush(keys.pipeline_order("p"), "1")
    async with api_client(api_settings(topics)) as api:
        response = await api.post("/api/v1/batches/p", headers=AUTH)
        assert response.status == 500
        text = await response.text()
        error = (await response.json())["error"]
        assert error["code"] == "internal" and error["request_id"]
        assert "Traceback" not in text and "ValidationError" not in text
        assert response.headers["X-Request-Id"] == error["request_id"]
    assert any(error["request_id"] in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'{"name": "x", "version": "1", "steps": []}',
    b'{"name": "x", "version": "1", "steps": [{"name": "a", "uses": "u"}, {"name": "a", "uses": "u"}]}',
    b'{"name": "bad name", "version": "1", "steps": [{"name": "a", "uses": "u"}]}',
    b'{"name": "x", "version": "1", "steps": [{"name": "a", "uses": "u"}], "extra": 1}',
    b'{"name": "x", "version": "1", "steps": [{"name": "a", "uses": "os.system"}]}',
])
async def test_invalid_pipeline_definition_400(topics: Settings, redis: Redis, body: bytes) -> None:
    async with api_client(api_settings(topics)) as api:
        response = await api.put("/api/v1/pipelines/p", data=body,
                                 headers={**AUTH, "Content-Type": "application/json"})
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "bad_request"
        assert await redis.keys("*") == []


async def test_pipeline_versions_are_immutable(topics: Settings, redis: Redis) -> None:
    async with api_client(api_settings(topics)) as api:
        assert (await api.put("/api/v1/pipelines/p", json=spec_body(), headers=AUTH)).status == 201
        same = await api.put("/api/v1/pipelines/p", json=spec_body(), headers=AUTH)
        assert same.status == 200 and (await same.json())["created"] is False
        changed = spec_body(steps=("extract", "load"))
        conflict = await api.put("/api/v1/pipelines/p", json=changed, headers=AUTH)
        assert conflict.status == 409
        assert (await api.put("/api/v1/pipelines/p", json=spec_body(version="2"), headers=AUTH)).status == 201
        described = await (await api.get("/api/v1/pipelines/p", headers=AUTH)).json()
        assert described["latest"] == "2"
        assert [(v["version"], v["latest"]) for v in described["versions"]] == [("1", False), ("2", True)]
        listed = await (await api.get("/api/v1/pipelines/", headers=AUTH)).json()
        assert list(listed["items"]) == ["p"]
        assert (await api.get("/api/v1/pipelines/nope", headers=AUTH)).status == 404


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A Redis of this test's own, so the test can take it down."""
    port = _free_port()
    server = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port),
                               "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL)
    try:
        yield server, port
    finally:
        server.kill()
        server.wait()


async def test_redis_down_503_and_back(topics: Settings,
                                       own_redis: tuple[subprocess.Popen[bytes], int]) -> None:
    server, port = own_redis
    settings = api_settings(topics, redis_url=f"redis://127.0.0.1:{port}/0")
    async with api_client(settings) as api:
        assert (await api.put("/api/v1/pipelines/p", json=spec_body(), headers=AUTH)).status == 201
        server.kill()
        server.wait()
        response = await api.get("/api/v1/batches/p/", headers=AUTH)
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "unavailable"
        assert (await api.post("/api/v1/batches/p", headers=AUTH)).status == 503
        ready = await api.get("/readyz")
        assert ready.status == 503 and (await ready.json())["checks"]["redis"] is False
        assert (await api.get("/healthz")).status == 200
