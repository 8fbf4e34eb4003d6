"""Conditional and long-poll GETs of a batch: `ETag`, `If-None-Match` -> 304, `?wait=`.

Every batch answer carries a strong ETag of its body (`service.cache.etag_of`). With
`If-None-Match` naming the current one the answer is 304 without a body; adding `?wait=N`
(1-60 s) holds the request until the batch changes (200 with the new body) or the wait ends
(304). A held request waits on the cache's change feed (`service.waiters`), not on Redis; while
the feed is down (the cache off) it re-reads once a second instead, so it can still answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

from aiohttp import web

from service.appkeys import CACHE, WAITERS
from service.cache import etag_of
from service.errors import bad_request

MAX_WAIT_S: Final = 60.0
MIN_WAIT_S: Final = 1.0
# How often a held request re-reads while the change feed is down.
DEGRADED_POLL_S: Final = 1.0


def tagged(body: bytes, etag: str) -> web.Response:
    return web.Response(body=body, content_type="application/json", headers={"ETag": etag})


def not_modified(etag: str) -> web.Response:
    return web.Response(status=304, headers={"ETag": etag})


def matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110's weak comparison of If-None-Match's list against the current ETag."""
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == etag:
            return True
    return False


def wait_s(request: web.Request) -> float | None:
    """The `wait` query parameter in seconds, None when absent; 400 when not 1-60."""
    if not request.query_string:
        return None
    raw = request.query.get("wait")
    if raw is None:
        return None
    try:
        value = float(raw) if raw.isascii() else None
    except ValueError:
        value = None
    if value is None or not MIN_WAIT_S <= value <= MAX_WAIT_S:
        raise bad_request(f"wait must be a number of seconds from {MIN_WAIT_S:g} to "
                          f"{MAX_WAIT_S:g}")
    return value


class _Signal(Protocol):
    """What a held request waits on: a `BatchFeed` or a `PipelineWatch` (service.waiters)."""

    wake: asyncio.Event

    def take(self) -> object: ...


async def answer_pipeline(request: web.Request, pipeline_id: str,
                          read: Callable[[web.Request], Awaitable[bytes]]) -> web.Response:
    """As `answer`, for an answer that depends on every batch of a pipeline (its latest):
    held until any of them changes or a batch is created, then read again."""

    async def tagged_read() -> tuple[bytes, str]:
        body = await read(request)
        return body, etag_of(body)

    wait = wait_s(request)
    if wait is None:
        return _answer_now(request, *await tagged_read())
    waiters = request.app[WAITERS]
    watch = waiters.watch(pipeline_id)
    try:
        return await _held(request, wait, watch, tagged_read)
    finally:
        waiters.unwatch(pipeline_id, watch)


async def current(request: web.Request, key: str,
                  read: Callable[[web.Request], Awaitable[bytes]]) -> tuple[bytes, str]:
    """The batch cached under `key` with its ETag, from the cache or else `read` (which
    answers 404 when there is no such batch)."""
    entry = request.app[CACHE].lookup(key)
    if entry is not None:
        return entry[0], entry[2]  # type: ignore[return-value]
    body = await read(request)
    return body, etag_of(body)


async def answer(request: web.Request, key: str,
                 read: Callable[[web.Request], Awaitable[bytes]]) -> web.Response:
    """The answer to a GET of the batch cached under `key` carrying If-None-Match; `read`
    gives the current body (404 when there is none)."""
    wait = wait_s(request)
    if wait is None:
        return _answer_now(request, *await current(request, key, read))
    waiters = request.app[WAITERS]
    feed = waiters.follow(key, long_poll=True)
    try:
        return await _held(request, wait, feed, lambda: current(request, key, read))
    finally:
        waiters.unfollow(key, feed)


def _answer_now(request: web.Request, body: bytes, etag: str) -> web.Response:
    if matches(request.headers.get("If-None-Match", ""), etag):
        return not_modified(etag)
    return tagged(body, etag)


async def _held(request: web.Request, wait: float, signal: _Signal,
                read: Callable[[], Awaitable[tuple[bytes, str]]]) -> web.Response:
    """Reads, and while the answer still matches If-None-Match waits on `signal` (registered
    by the caller before the first read, emptied before every read: a change during a read
    wakes the next wait) until a change or the end of `wait` seconds."""
    if_none_match = request.headers.get("If-None-Match", "")
    cache, waiters = request.app[CACHE], request.app[WAITERS]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        signal.take()
        body, etag = await read()
        if not matches(if_none_match, etag):
            return tagged(body, etag)
        remaining = deadline - loop.time()
        if remaining <= 0 or waiters.closing:
            return not_modified(etag)
        timeout = remaining if cache.live else min(remaining, DEGRADED_POLL_S)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await signal.wake.wait()
