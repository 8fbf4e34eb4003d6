"""Which requests get a push stream (service.streams.wants_stream): a GET whose Accept takes
`text/event-stream`; a HEAD of a stream's URL gets the plain answer's headers and no body."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core.scripts import Scripts
from core.settings import Settings
from core.store import BatchStore
from tests.helpers import AUTH, STATIC_TOKEN, api_client, api_settings, spec

Client = TestClient[Any, Any]
P = "p"
SSE = {**AUTH, "Accept": "text/event-stream"}


async def _batches(redis: Redis, n: int) -> list[str]:
    store = BatchStore(redis, Scripts(redis), token_secret=b"unused")
    ids = [f"b{k:03d}" for k in range(n)]
    for batch_id in ids:
        await store.create(P, batch_id, spec())
    return ids


async def _after_head(api: Client, path: str) -> bytes:
    """HEAD `path` asking for the push stream, then (pipelined, on the same connection) a
    plain GET of the latest batch; returns the first bytes the server sends after the
    HEAD's header block (a HEAD's answer has no body: they must be the GET's status line)."""
    reader, writer = await asyncio.open_connection(api.server.host, api.server.port)
    try:
        auth = f"Authorization: Bearer {STATIC_TOKEN}\r\n"
        writer.write((f"HEAD {path} HTTP/1.1\r\nHost: t\r\n{auth}"
                      "Accept: text/event-stream\r\n\r\n"
                      f"GET /api/v1/batches/{P} HTTP/1.1\r\nHost: t\r\n{auth}\r\n").encode())
        await writer.drain()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            return await reader.readexactly(9)
    finally:
        writer.close()


async def test_a_head_of_either_stream_sends_no_body(
        test_settings: Settings, redis: Redis) -> None:
    # A HEAD's answer never has a body (RFC 9110 9.3.2): a client or proxy reusing the
    # connection reads what follows its headers as the next answer. A stream's events
    # there, never ending, left the next request on that connection unanswered.
    await _batches(redis, 2)
    async with api_client(api_settings(test_settings)) as api:
        for path in (f"/api/v1/batches/{P}/", f"/api/v1/batches/{P}/b001"):
            assert await _after_head(api, path) == b"HTTP/1.1 ", path


async def test_a_pooled_client_survives_a_head_of_the_stream(
        test_settings: Settings, redis: Redis) -> None:
    # aiohttp's pooled client, a HEAD with EventSource's Accept (a link checker, a monitor),
    # then a plain GET on the same connection: the HEAD's answer is the JSON one's headers.
    await _batches(redis, 2)
    async with api_client(api_settings(test_settings)) as api:
        head = await api.head(f"/api/v1/batches/{P}/", headers=SSE)
        assert (head.status, head.content_type) == (200, "application/json")
        head.release()
        async with asyncio.timeout(10):
            response = await api.get(f"/api/v1/batches/{P}", headers=AUTH)
            assert response.status == 200
            assert (await response.json())["id"] == "b001"


async def test_accept_is_negotiated_not_matched_as_a_substring(
        test_settings: Settings, redis: Redis) -> None:
    # `q=0` says "not acceptable" (RFC 9110 12.4.2); JSON preferred is JSON, by its own
    # range or a wildcard covering it; an unrelated type that merely contains the name is
    # not the stream.
    await _batches(redis, 2)
    plain = ["text/event-stream;q=0", "text/event-stream; q=0.000, application/json",
             "application/json, text/event-stream;q=0.5", "text/event-stream-x",
             "text/event-stream;q=2", "text/event-stream;q=0.1, */*",
             "text/event-stream;q=0.5, application/*"]
    streamed = ["text/event-stream", "application/json;q=0.9, Text/Event-Stream",
                "*/*;q=0.1, text/event-stream;q=0.2"]
    async with api_client(api_settings(test_settings)) as api:
        for accept in plain + streamed:
            for path in (f"/api/v1/batches/{P}/", f"/api/v1/batches/{P}/b001"):
                async with asyncio.timeout(10):
                    response = await api.get(path, headers={**AUTH, "Accept": accept})
                    kind = response.content_type
                    response.close()
                assert response.status == 200, (accept, path)
                want = "text/event-stream" if accept in streamed else "application/json"
                assert kind == want, (accept, path)
