"""One JSON error shape for every failure, and the edge that converts errors into it.

`{"error": {"code": "...", "message": "...", "request_id": "..."}}` — no stack trace ever
reaches a client; unexpected errors are logged with the request id and answered 500.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any, Final

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from aiokafka.errors import KafkaError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.retry import Verdict, classify, describe
from service.request_log import CURRENT_REQUEST, HELD, REQUEST_ID

log = logging.getLogger(__name__)

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Request ids: a random per-process prefix and a counter; unique, and far cheaper than uuid4.
_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count(1)

# HTTP status -> stable error code, for errors raised by aiohttp itself (routing, body size).
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    431: "header_too_large",
    500: "internal",
    503: "unavailable",
    505: "http_version_not_supported",
}
# Headers of aiohttp's own HTTP errors that a client needs (RFC 9110: a 405 names the methods).
_KEPT_HEADERS = ("Allow",)


def code_for(status: int) -> str:
    """The stable error code of an HTTP status."""
    return _HTTP_CODES.get(status, "error")


class ApiError(Exception):
    """A domain error with its HTTP status; raised anywhere, answered by the edge."""

    def __init__(self, status: int, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


def bad_request(message: str, **details: Any) -> ApiError:
    return ApiError(400, "bad_request", message, **details)


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


def new_request_id() -> str:
    return f"{_ID_PREFIX}-{next(_ID_COUNTER):x}"


def error_response(status: int, code: str, message: str, request_id: str,
                   details: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body: dict[str, Any] = {"code": code, "message": message, "request_id": request_id}
    if details:
        body["details"] = details
    return web.Response(
        status=status,
        body=orjson.dumps({"error": body}),
        content_type="application/json",
        headers={**(headers or {}), "X-Request-Id": request_id},
    )


# What the edge reports for every request: route name, method, status, seconds.
Observe = Callable[[str, str, int, float], None]


# What a request whose client hung up before its answer is counted as (nginx's status).
CLIENT_CLOSED: Final = 499


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def at_edge(handler: Handler, route: str, authenticate: Callable[[web.Request], None] | None,
            observe: Observe | None = None) -> Handler:
    """`handler` behind the API's edge: a request id (noted for the log lines:
    service.request_log), then `authenticate` (service.auth; None for a public route), then
    the handler, with every error answered as JSON, and each request reported to `observe`
    (service.metrics) under `route`. A wrapper per route rather than an aiohttp middleware:
    the middleware chain (a cached build, two partials, aiohttp's own current-app layer)
    cost a cached GET about as much CPU as the edge's own work (BENCHMARKS.md). Routing
    errors reach the edge through service.routes' catch-all route; a request whose target
    is not a path (`OPTIONS *`, `CONNECT host:port`) matches no route, and aiohttp answers
    it itself (a plain-text 404)."""
    async def edge(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        incoming = request.headers.get("X-Request-Id")
        request_id = incoming if incoming and _REQUEST_ID_RE.match(incoming) else new_request_id()
        request[REQUEST_ID] = request_id
        # Set here and read below: a key absent from a request costs aiohttp a KeyError raised
        # and caught (its Mapping's `in`), on every request.
        request[HELD] = False
        CURRENT_REQUEST.set(request)
        response: web.StreamResponse
        try:
            if authenticate is not None:
                authenticate(request)
            response = await handler(request)
            if not response.prepared:  # a stream has sent its headers already
                response.headers["X-Request-Id"] = request_id
        except ApiError as exc:
            response = error_response(exc.status, exc.code, exc.message, request_id, exc.details)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            kept = {name: exc.headers[name] for name in _KEPT_HEADERS if name in exc.headers}
            response = error_response(exc.status, code_for(exc.status), exc.reason, request_id,
                                      headers=kept)
        except (RedisConnectionError, RedisTimeoutError, KafkaError, TimeoutError) as exc:
            log.warning("dependency unavailable request_id=%s: %s", request_id,
                        type(exc).__name__)
            response = error_response(503, "unavailable",
                                      "a dependency is unavailable; retry later", request_id)
        except Exception as exc:
            if isinstance(exc, ConnectionError) and _client_gone(request):
                # The client hung up mid-request (its time-out, a crash): aiohttp fails the
                # body's read with ConnectionResetError. Not a dependency's outage, and no one
                # reads the answer; counted apart (nginx's 499), so an overload's time-outs do
                # not read as Redis or Kafka down.
                log.info("client closed the connection request_id=%s", request_id)
                response = error_response(CLIENT_CLOSED, "client_closed",
                                          "the client closed the connection", request_id)
            elif classify(exc) is Verdict.UNAVAILABLE:
                # Redis refusing for now (OOM, READONLY after a failover, LOADING...): the
                # same answer as Redis unreachable, since nothing was written.
                log.warning("dependency unavailable request_id=%s: %s", request_id,
                            describe(exc))
                response = error_response(503, "unavailable",
                                          "a dependency is unavailable; retry later", request_id)
            else:
                log.exception("unexpected error request_id=%s", request_id)
                response = error_response(500, "internal",
                                          "unexpected error; quote the request id", request_id)
        if observe is not None:
            series = route
            if response.__class__ is web.StreamResponse:  # a push stream: its own series
                series += ".stream"
            elif request[HELD]:  # a long-poll that waited: so is it
                series += ".held"
            observe(series, request.method, response.status, time.perf_counter() - started)
        return response

    return edge
