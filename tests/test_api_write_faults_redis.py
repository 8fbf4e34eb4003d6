"""The API through a Redis outage, on a private redis-server this test kills and restarts (the
shared one is never touched): 503 JSON quickly while it is down, and once it is back the
first burst of concurrent requests all succeed (no stale pooled connection fails a request,
no burst fails on the pool's size)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core import keys
from core.settings import Settings
from tests.conftest import eventually
from tests.helpers import AUTH, api_client, api_settings, spec_body

Client = TestClient[Any, Any]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A redis-server of this test's own, durable (AOF, fsync always) so a restart keeps data."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--maxclients", "1000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    async def ready(self) -> bool:
        client = Redis(port=self.port, socket_connect_timeout=0.5)
        try:
            return bool(await client.ping())
        except Exception:
            return False
        finally:
            await client.aclose()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def api(topics: Settings, private_redis: PrivateRedis) -> AsyncIterator[Client]:
    await eventually(private_redis.ready, timeout=10)
    async with api_client(api_settings(topics, redis_url=private_redis.url)) as client:
        response = await client.put("/api/v1/pipelines/p", json=spec_body(), headers=AUTH)
        assert response.status == 201
        yield client


async def _timed(api: Client, method: str, path: str) -> tuple[int, str, float]:
    started = time.monotonic()
    response = await api.request(method, path, headers=AUTH)
    await response.read()
    return response.status, response.content_type, time.monotonic() - started


async def _burst(api: Client, batch_id: str, n: int = 70) -> list[int]:
    calls = [_timed(api, "GET", f"/api/v1/batches/p/{batch_id}") if i % 2 else
             _timed(api, "POST", "/api/v1/batches/p") for i in range(n)]
    return [status for status, _, _ in await asyncio.gather(*calls)]


async def test_a_burst_right_after_a_redis_restart_all_succeeds(
        api: Client, private_redis: PrivateRedis) -> None:
    created = await api.post("/api/v1/batches/p", headers=AUTH)
    assert created.status == 200
    batch_id = (await created.json())["item"]
    # Fill the pool with connections that the restart will break.
    assert set(await _burst(api, batch_id)) == {200}

    private_redis.kill()
    # The list is read from Redis on every call (never from the cache).
    down = await asyncio.gather(*(_timed(api, "GET", "/api/v1/batches/p/") for _ in range(20)))
    assert {status for status, _, _ in down} == {503}
    assert {ctype for _, ctype, _ in down} == {"application/json"}
    slowest = max(seconds for _, _, seconds in down)
    assert slowest < 10, f"a GET hung {slowest:.1f}s while Redis was down"
    print(f"\nwhile Redis was down: 20 GETs answered 503 in at most {slowest:.2f}s")

    private_redis.start()
    await eventually(private_redis.ready, timeout=10)
    await asyncio.sleep(2)  # the scenario: a burst 2 s after Redis is back
    statuses = await _burst(api, batch_id)
    failed = [s for s in statuses if s != 200]
    assert not failed, f"{len(failed)} of {len(statuses)} requests failed after the restart"


async def test_a_burst_larger_than_the_pool_waits_instead_of_failing(
        api: Client, private_redis: PrivateRedis) -> None:
    created = await api.post("/api/v1/batches/p", headers=AUTH)
    batch_id = (await created.json())["item"]
    statuses = await _burst(api, batch_id, n=400)
    assert set(statuses) == {200}


async def test_a_redis_refusing_writes_answers_503_and_changes_nothing(
        api: Client, private_redis: PrivateRedis) -> None:
    # Out of memory (noeviction): what Redis answers for writes also while a replica is
    # promoted (READONLY) or data is loading (LOADING). Not a bug of ours: 503, retry later.
    direct = Redis(port=private_redis.port, decode_responses=True)
    try:
        await direct.config_set("maxmemory", "1")
        try:
            response = await api.post("/api/v1/batches/p", headers=AUTH)
            body = await response.json()
        finally:
            await direct.config_set("maxmemory", "0")
        assert response.status == 503, body
        assert body["error"]["code"] == "unavailable"
        assert await direct.zcard(keys.batch_index("p")) == 0
    finally:
        await direct.aclose()
