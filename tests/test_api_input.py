"""Bad input never produces a 5xx: every answer is the JSON error shape of service/errors.py.

Headers are sent as raw bytes over a socket, so values no HTTP client library would build
(non-ASCII, thousands of digits, oversize request lines) reach the server as an attacker
would send them.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from aiohttp import web
from pydantic import SecretStr
from redis.asyncio import Redis

from core.models import PipelineSpec
from core.settings import Settings
from service.app import init_app
from service.edge import ApiRunner
from service.webhook import signature
from tests.helpers import AUTH, STATIC_TOKEN, api_client, api_settings, spec_body

HOOK_SECRET = "hook-secret-for-input-tests"


@asynccontextmanager
async def edge_server(settings: Settings) -> AsyncIterator[int]:
    """The API served the way `python -m service` serves it (service.edge), on a free port."""
    runner = ApiRunner(init_app(settings), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def raw(port: int | None, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request as raw bytes; the status, headers (lower-case names) and body."""
    assert port is not None, "the server is not listening"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(20):
            data = await reader.read(-1)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def http(method: str, target: str, headers: Mapping[str, bytes | str] | None = None,
         body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close",
             f"Content-Length: {len(body)}".encode()]
    for name, value in (headers or {}).items():
        lines.append(name.encode() + b": " + (value if isinstance(value, bytes) else value.encode()))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def json_error(status: int, headers: dict[str, str], body: bytes, expected: int | tuple[int, ...]) -> Any:
    allowed = expected if isinstance(expected, tuple) else (expected,)
    assert status in allowed, (status, body[:300])
    assert headers["content-type"].startswith("application/json"), headers
    error = orjson.loads(body)["error"]
    assert error["code"] and error["message"] and error["request_id"]
    return error


BEARER = {"Authorization": f"Bearer {STATIC_TOKEN}"}


async def test_paging_token_with_non_ascii_signature_is_400(topics: Settings, redis: Redis) -> None:
    async with api_client(api_settings(topics)) as api:
        assert (await api.put("/api/v1/pipelines/p", json=spec_body(), headers=AUTH)).status == 201
        for _ in range(2):
            assert (await api.post("/api/v1/batches/p", headers=AUTH)).status == 200
        page = await (await api.get("/api/v1/batches/p/?limit=1", headers=AUTH)).json()
        encoded, _, _ = page["token"].partition(".")
        for token in (f"{encoded}.é", f"{encoded}.\u00e9\u00e9\u00e9", "é.é", f"{encoded}.%FF"):
            response = await api.get("/api/v1/batches/p/", params={"token": token}, headers=AUTH)
            body = await response.read()
            error = json_error(response.status, dict(response.headers.items()) | {
                "content-type": response.content_type}, body, 400)
            assert error["code"] == "bad_request"


@pytest.mark.parametrize("timestamp", [
    "\u0661\u0667" + "\u0660" * 8,   # Arabic-Indic digits pass str.isdigit()
    "\u00b2\u00b3",                    # superscripts pass isdigit() but not int()
    b"9" * 5000,                       # beyond int()'s 4,300-digit limit
    b"\xff\xfe",                       # not UTF-8 at all
    b"-1",
])
async def test_webhook_timestamp_garbage_is_401_json(topics: Settings, redis: Redis,
                                                     timestamp: bytes | str) -> None:
    body = b'{"id": "x"}'
    async with api_client(api_settings(topics, webhook_secret=SecretStr(HOOK_SECRET))) as api:
        request = http("POST", "/api/v1/hooks/prefect", {
            "Content-Type": "application/json", "X-Dhub-Timestamp": timestamp,
            "X-Dhub-Signature": "sha256=" + "0" * 64}, body)
        error = json_error(*await raw(api.port, request), expected=(400, 401))
        assert error["code"] in ("unauthorized", "bad_request")


async def test_webhook_non_ascii_signature_is_401_json(topics: Settings, redis: Redis) -> None:
    body = b'{"id": "x"}'
    ts = str(int(time.time()))
    async with api_client(api_settings(topics, webhook_secret=SecretStr(HOOK_SECRET))) as api:
        for given in ("sha256=é".encode(), b"sha256=\xff", signature(b"x", ts, body).encode() + b"\xc3\xa9"):
            request = http("POST", "/api/v1/hooks/prefect", {
                "Content-Type": "application/json", "X-Dhub-Timestamp": ts,
                "X-Dhub-Signature": given}, body)
            json_error(*await raw(api.port, request), expected=401)


def _deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


@pytest.mark.parametrize("config", [
    b'{"n": 18446744073709551616}',                 # 2**64: orjson cannot write it
    b'{"n": -9223372036854775809}',                 # below int64
    b'{"n": 9007199254740993}',                     # 2**53 + 1: Lua and JSON readers round it
    b'{"n": [1, {"m": 123456789012345678901234567890}]}',
    b'{"n": 1e999}',                                 # infinity
    b'{"n": NaN}',
    b'{"s": "\\ud800"}',                             # a lone surrogate: not encodable as UTF-8
    b"[" * 300 + b"]" * 300,                         # deeper than orjson writes
])
async def test_step_config_out_of_range_is_400(topics: Settings, redis: Redis, config: bytes) -> None:
    body = (b'{"name": "x", "version": "1", "steps": [{"name": "a", "uses": "sales.extract", '
            b'"config": ' + config + b"}]}")
    async with api_client(api_settings(topics)) as api:
        response = await api.put("/api/v1/pipelines/p", data=body,
                                 headers={**AUTH, "Content-Type": "application/json"})
        assert response.status == 400, await response.text()
        assert (await response.json())["error"]["code"] == "bad_request"
    assert await redis.keys("*") == []


async def test_step_config_within_range_is_accepted(topics: Settings, redis: Redis) -> None:
    # Any JSON value within range is a valid config as far as the definition goes...
    generic = {"n": 2**53 - 1, "m": -(2**53 - 1), "f": 1.5, "deep": _deep(20), "s": "é",
               "l": [None, True, "x"]}
    body = spec_body()
    body["steps"][0]["config"] = generic
    assert PipelineSpec.model_validate(body).steps[0].config == generic
    # ... and the API stores what the step implementation's own model accepts, exactly.
    body["steps"][0]["config"] = {"seed": 2**53 - 1, "throttle": 1.5, "rows": 0}
    async with api_client(api_settings(topics)) as api:
        response = await api.put("/api/v1/pipelines/p", json=body, headers=AUTH)
        assert response.status == 201, await response.text()
        described = await response.json()
        assert described["versions"][0]["steps"][0]["config"] == body["steps"][0]["config"]


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("PATCH", "/api/v1/batches/p", {"GET", "HEAD", "POST"}),
    ("DELETE", "/api/v1/pipelines/p", {"GET", "HEAD", "PUT"}),
    ("POST", "/api/v1/batches/p/b/stop", {"PUT"}),
    ("PUT", "/healthz", {"GET", "HEAD"}),
    ("GET", "/api/v1/hooks/prefect", {"POST"}),
])
async def test_every_405_carries_allow(topics: Settings, redis: Redis, method: str, path: str,
                                       allowed: set[str]) -> None:
    async with api_client(api_settings(topics)) as api:
        response = await api.request(method, path, headers=AUTH)
        assert response.status == 405
        assert {m.strip() for m in response.headers["Allow"].split(",")} == allowed
        assert (await response.json())["error"]["code"] == "method_not_allowed"


async def test_oversize_request_line_is_json_414(topics: Settings, redis: Redis) -> None:
    async with edge_server(api_settings(topics)) as port:
        request = http("GET", "/api/v1/batches/p/?token=" + "a" * 9000, BEARER)
        error = json_error(*await raw(port, request), expected=414)
        assert error["code"] == "uri_too_long"
        # A well-formed request still works on a new connection.
        status, _, _ = await raw(port, http("GET", "/healthz"))
        assert status == 200


async def test_oversize_header_is_json_431(topics: Settings, redis: Redis) -> None:
    async with edge_server(api_settings(topics)) as port:
        request = http("GET", "/api/v1/pipelines/", {**BEARER, "X-Big": "b" * 9000})
        error = json_error(*await raw(port, request), expected=431)
        assert error["code"] == "header_too_large"


@pytest.mark.parametrize("request_bytes", [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",      # no colon
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",                 # TLS to a plain port
    b"GET /healthz HTTP/9.9\r\n\r\n",
])
async def test_malformed_requests_are_json_400(topics: Settings, redis: Redis,
                                               request_bytes: bytes) -> None:
    async with edge_server(api_settings(topics)) as port:
        error = json_error(*await raw(port, request_bytes), expected=(400, 505))
        assert error["code"] in ("bad_request", "http_version_not_supported")


async def test_serve_answers_json_and_stops_cleanly_on_sigterm(test_settings: Settings) -> None:
    """`service.edge.serve` as `python -m service` should run it: JSON 414 from a real process,
    and SIGTERM closes it with exit status 0."""
    import signal
    import socket
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    code = ("import asyncio; from core.settings import get_settings; from service.app import init_app; "
            "from service.edge import serve; s = get_settings(); "
            "asyncio.run(serve(init_app(s), s.api_host, s.api_port, access_log=None))")
    env = {**os.environ, "DHUB_API_PORT": str(port), "DHUB_REDIS_URL": test_settings.redis_url,
           "DHUB_API_CACHE": "false"}
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", code, env=env,
                                                   stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.DEVNULL)
    try:
        async with asyncio.timeout(30):
            while True:
                try:
                    status, _, _ = await raw(port, http("GET", "/healthz"))
                    if status == 200:
                        break
                except OSError:
                    pass
                await asyncio.sleep(0.2)
        error = json_error(*await raw(port, http("GET", "/x?" + "a" * 9000)), expected=414)
        assert error["code"] == "uri_too_long"
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_an_oversize_authorization_header_is_not_logged(topics: Settings, redis: Redis,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    secret = "S3CRET" * 2000
    async with edge_server(api_settings(topics)) as port:
        request = http("GET", "/api/v1/pipelines/", {"Authorization": f"Bearer {secret}"})
        json_error(*await raw(port, request), expected=431)
    assert "S3CRET" not in caplog.text


async def test_a_step_config_naming_a_worker_path_is_refused_at_registration(
        topics: Settings, redis: Redis) -> None:
    body = spec_body()
    body["steps"][2]["config"] = {"db_path": "/etc/dhub.db"}
    async with api_client(api_settings(topics)) as api:
        response = await api.put("/api/v1/pipelines/p", json=body, headers=AUTH)
        assert response.status == 400, await response.text()
        error = (await response.json())["error"]
    assert error["message"] == "invalid step config"
    assert [p["loc"] for p in error["details"]["problems"]] == ["steps.2.config"]
    assert await redis.keys("*") == []  # nothing registered, nothing queued
