"""Scenario 6: the cache's invalidation connection silently blackholed.

A second API process of the chaos stack reaches Redis through a proxy; once it has cached
two batches, the proxy drops every byte of its pub/sub connection both ways without closing
it. One batch then changes, the other is deleted: that API must show both within 5 s.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from redis.asyncio import Redis

from core.settings import ROOT
from tests.chaos.proxy import BlackholeProxy
from tests.chaos.stackctl import ChaosStack, port_of
from tests.chaos.streams import event, open_producer, seed_batches
from tests.chaos.watch import client, report

FRESH_S = 5.0


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def extra_api(chaos: ChaosStack, redis_url: str, port: int) -> Iterator[str]:
    """`python -m service` on another port with its Redis through `redis_url`."""
    env = {**os.environ, "DHUB_REDIS_URL": redis_url, "DHUB_API_PORT": str(port),
           "DHUB_REDIS_PORT": str(port_of(redis_url))}
    log = chaos.settings.state_dir / "logs" / "chaos-api-proxied.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def until(check: object, timeout: float) -> float | None:
    """Seconds until `check()` (async) is true, or None after `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if await check():  # type: ignore[operator]
            return time.monotonic() - t0
        await asyncio.sleep(0.05)
    return None


@pytest.mark.timeout(120)
async def test_blackholed_invalidations(chaos: ChaosStack, chaos_redis: Redis,
                                        http: httpx.AsyncClient) -> None:
    pipeline_id, (changed, deleted) = await seed_batches(chaos_redis, chaos.settings,
                                                         "chaos-hole", 2)
    proxy = BlackholeProxy(port_of(chaos.settings.redis_url))
    proxy_port = await proxy.start()
    try:
        with extra_api(chaos, f"redis://127.0.0.1:{proxy_port}/0", free_port()) as url:
            async with client(url, chaos.token, timeout=10) as other:
                async def up() -> bool:
                    try:
                        return (await other.get("/healthz")).status_code == 200
                    except httpx.HTTPError:
                        return False

                assert await until(up, 30) is not None, "the proxied API did not start"

                async def state(batch_id: str) -> str | int:
                    r = await other.get(f"/api/v1/batches/{pipeline_id}/{batch_id}")
                    return str(r.json()["state"]["state"]) if r.status_code == 200 else r.status_code

                for _ in range(3):  # cached now, by any cache that fills on a read
                    assert await state(changed) == "pending" and await state(deleted) == "pending"
                assert await until(lambda: asyncio.sleep(0, result=any(
                    link.subscriber for link in proxy.links)), 5) is not None, \
                    "the proxied API never subscribed through the proxy"
                darkened = proxy.blackhole_subscribers()

                producer = await open_producer(chaos.settings)
                try:
                    await producer.send_and_wait(
                        chaos.settings.topic_events, key=changed.encode(),
                        value=event("batch.state", pipeline_id, changed, state="running"))
                finally:
                    await producer.stop()
                t_event = time.monotonic()

                async def seen_by_main() -> bool:
                    r = await http.get(f"/api/v1/batches/{pipeline_id}/{changed}")
                    return bool(r.json()["state"]["state"] == "running")

                applied = await until(seen_by_main, 30)
                fresh = await until(lambda: _is(state(changed), "running"), FRESH_S + 10)
                change_s = time.monotonic() - t_event if fresh is not None else None

                assert (await http.delete(f"/api/v1/batches/{pipeline_id}/{deleted}")).status_code == 200
                gone = await until(lambda: _is(state(deleted), 404), FRESH_S + 10)
    finally:
        await proxy.stop()
    report("invalidation connection blackholed (second API process behind a proxy)",
           pubsub_connections_darkened=darkened, bytes_dropped=proxy.dropped_bytes,
           event_applied_to_redis_after=f"{applied:.2f}s" if applied is not None else "never",
           change_visible_on_proxied_API_after=f"{change_s:.2f}s" if change_s else "not within 15s",
           delete_visible_on_proxied_API_after=f"{gone:.2f}s" if gone is not None else "not within 15s")
    assert darkened >= 1
    assert change_s is not None and change_s <= FRESH_S, \
        f"GET still stale {FRESH_S}s after the change (fresh after {change_s})"
    assert gone is not None and gone <= FRESH_S, f"a deleted batch still served after {FRESH_S}s"


async def _is(value: object, expected: object) -> bool:
    return bool(await value == expected)  # type: ignore[misc]
