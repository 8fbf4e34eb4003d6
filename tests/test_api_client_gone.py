"""A client that goes away while sending its request body is not a dependency outage.

It was (fixed: service.errors.at_edge counts it as 499, "client_closed", logged at info):

Served as `python -m service` serves (service.edge.ApiRunner: aiohttp's default
handler_cancellation=False, unlike aiohttp's TestServer), a lost connection makes aiohttp set
a ConnectionResetError("Connection lost") on the request's payload
(web_protocol.connection_lost -> request._cancel). The handler's `await request.read()`
raises it, and the edge (service.errors.at_edge) classifies it with core.retry.classify,
which reads every builtin ConnectionError as "dependency unavailable": the request is logged
"dependency unavailable" and counted in dhub_http_request_duration_seconds as a 503 of
run_batch, as if Redis or Kafka were down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from core.settings import Settings
from service.app import init_app
from service.edge import ApiRunner
from tests.conftest import eventually
from tests.helpers import STATIC_TOKEN, api_settings, bearer
from tests.test_api_auth import hs_token


@asynccontextmanager
async def edge_server(settings: Settings) -> AsyncIterator[tuple[int, ApiRunner]]:
    runner = ApiRunner(init_app(settings), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield int(runner.addresses[0][1]), runner
    finally:
        await runner.cleanup()


def _counts(text: str) -> dict[tuple[str, str, str], float]:
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return {(s.labels["route"], s.labels["method"], s.labels["status"]): s.value
            for s in families["dhub_http_request_duration_seconds"].samples
            if s.name.endswith("_count")}


@pytest.mark.parametrize("path", ["/api/v1/batches/some-pipeline",
                                  "/api/v1/pipelines/some-pipeline"])
async def test_a_client_gone_mid_body_is_not_counted_as_a_5xx(
        test_settings: Settings, redis: Redis, caplog: pytest.LogCaptureFixture,
        path: str) -> None:
    caplog.set_level(logging.INFO)
    method = "POST" if "/batches/" in path else "PUT"
    async with edge_server(api_settings(test_settings)) as (port, runner), \
            aiohttp.ClientSession() as session:
        assert runner.server is not None
        before = runner.server.requests_count
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {STATIC_TOKEN}\r\n"
                "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        writer.write(head.encode() + b'{"config": {"a": "')  # the body's start only
        await writer.drain()
        # The handler runs (reading the body) once the server took the request.
        await eventually(lambda: runner.server.requests_count > before, timeout=10)
        writer.transport.abort()  # the client gives up: its timeout, a crash, a redeploy

        async def observed() -> dict[tuple[str, str, str], float] | None:
            async with session.get(f"http://127.0.0.1:{port}/metrics",
                                   headers=bearer(hs_token("metrics:read"))) as response:
                counts = _counts(await response.text())
            return {k: v for k, v in counts.items() if k[1] == method} or None

        answered = cast(dict[tuple[str, str, str], float],
                        await eventually(observed, timeout=10))
    unavailable = [r.getMessage() for r in caplog.records
                   if "dependency unavailable" in r.getMessage()]
    # Redis and Kafka were fine all along: no 5xx series, no "dependency unavailable" line.
    assert not any(status.startswith("5") for _, _, status in answered), (answered,
                                                                           unavailable)
    assert not unavailable
    route = "run_batch" if method == "POST" else "put_pipeline"
    assert answered == {(route, method, "499"): 1.0}
