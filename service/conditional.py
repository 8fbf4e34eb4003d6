"""Conditional and long-poll GETs of a batch: `ETag`, `If-None-Match` -> 304, `?wait=`.

Every batch answer carries a strong ETag of its body (`service.cache.etag_of`). With
`If-None-Match` naming the current one the answer is 304 without a body; adding `?wait=N`
(1-60 s) holds the request until the batch changes (200 with the new body) or the wait ends
(304). A held request waits on the cache's change feed (`service.waiters`), not on Redis; while
the feed is down (the cache off) it re-reads once a second instead, so it can still answer;
and at least every `cache.ttl_s` while it is up, for a change made without a message.
A held request never answers a version older than the one it named: the change feed can
deliver a change after a read that saw a newer one, and what the cache answers is ordered by
the hash's `rev` (service.cache); a read of a rev not above the named one is no change.
Nor older than the version it named when that came from another API process whose feed is
ahead of this one's: a named ETag the cache does not hold is checked against Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

from aiohttp import web

from service.appkeys import CACHE, WAITERS
from service.auth import EXPIRES_KEY
from service.cache import etag_of
from service.errors import ApiError, bad_request
from service.request_log import HELD

MAX_WAIT_S: Final = 60.0
MIN_WAIT_S: Final = 1.0
# How often a held request re-reads while the change feed is down.
DEGRADED_POLL_S: Final = 1.0


# A batch read from Redis: its rendered body and its hash's `rev` (service.fills.Read).
VersionedRead = Callable[[web.Request], Awaitable[tuple[bytes, int]]]


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

    async def tagged_read(fresh: bool = False) -> tuple[bytes, str, int]:
        body = await read(request)  # from Redis always: `fresh` or not
        return body, etag_of(body), 0  # no order among versions of "the latest"

    wait = wait_s(request)
    if wait is None:
        body, etag, _ = await tagged_read()
        return _answer_now(request, body, etag)
    waiters = request.app[WAITERS]
    watch = waiters.watch(pipeline_id, long_poll=True)
    try:
        return await _held(request, wait, watch, tagged_read)
    finally:
        waiters.unwatch(pipeline_id, watch)


async def current(request: web.Request, key: str, read: VersionedRead,
                  named: str | None = None, *, fresh: bool = False) -> tuple[bytes, str, int]:
    """The batch cached under `key` with its ETag and rev, from the cache or else `read`
    (which answers 404 when there is no such batch); `fresh`: from `read` only.

    `named`: the version the client holds (If-None-Match, Last-Event-ID). When the cache's
    entry is not it, that version may be newer than the entry: another API process answered
    it before this one's change feed delivered the change (each process has its own feed,
    and nothing orders one process's feed with another's reads). An ETag is a hash, with no
    order, so the batch is then read from Redis: never older than any process answered."""
    if not fresh:
        test = None if not named else (lambda etag: matches(named, etag))
        entry = request.app[CACHE].lookup(key, test)
        if entry is not None:
            return entry[0], entry[2], entry[3]  # type: ignore[return-value]
    body, rev = await read(request)
    return body, etag_of(body), rev


async def answer(request: web.Request, key: str, read: VersionedRead) -> web.Response:
    """The answer to a GET of the batch cached under `key` carrying If-None-Match; `read`
    gives the current body (404 when there is none)."""
    wait = wait_s(request)
    named = request.headers.get("If-None-Match", "")
    if wait is None:
        body, etag, _ = await current(request, key, read, named)
        return _answer_now(request, body, etag)
    waiters = request.app[WAITERS]
    feed = waiters.follow(key, long_poll=True)
    reads = 0

    async def held_read(fresh: bool) -> tuple[bytes, str, int]:
        # Only the first read checks the named version against Redis: once a read matched
        # it, its rev orders what the cache answers after (a lagging feed's older versions
        # are no change), and a read that did not match is answered at once. A `fresh` read
        # (the backstop, after a wait that nothing woke) is Redis's: the cache's entry may
        # have been stored just before the wait and not have expired yet.
        nonlocal reads
        reads += 1
        return await current(request, key, read, named if reads == 1 else None, fresh=fresh)

    try:
        return await _held(request, wait, feed, held_read)
    finally:
        waiters.unfollow(key, feed)


def _answer_now(request: web.Request, body: bytes, etag: str) -> web.Response:
    if matches(request.headers.get("If-None-Match", ""), etag):
        return not_modified(etag)
    return tagged(body, etag)


async def _held(request: web.Request, wait: float, signal: _Signal,
                read: Callable[[bool], Awaitable[tuple[bytes, str, int]]]) -> web.Response:
    """Reads, and while the answer still matches If-None-Match (or is a cached one of a rev
    not above the one that matched) waits on `signal` (registered by the caller before the first
    read, emptied before every read: a change during a read wakes the next wait) until a
    change or the end of `wait` seconds."""
    if_none_match = request.headers.get("If-None-Match", "")
    cache, waiters = request.app[CACHE], request.app[WAITERS]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    # A token is checked once, when the request comes: held, the request reads nothing
    # after the token's `exp` (as a push stream is cut then: service.auth.until_expiry).
    expires = request.get(EXPIRES_KEY)
    expiry = None if expires is None else loop.time() + max(expires - time.time(), 0.0)
    named: tuple[str, int] | None = None  # the version named, once a read matched it
    fresh = False  # the last wait ended on its timeout, not on a change
    while True:
        if expiry is not None and loop.time() >= expiry:
            raise ApiError(401, "unauthorized", "the bearer token expired while the request "
                           "was held; send it again with a valid token")
        signal.take()
        body, etag, rev = await read(fresh)
        if matches(if_none_match, etag):
            named = (etag, rev)
        elif named is None or fresh or not 0 < rev <= named[1]:
            # A read from Redis (`fresh`) is never older than the version named: another
            # body is a change even at the same rev (one rendered otherwise: a step's
            # `stalled`) or a lower one (a hash restored, then written again).
            return tagged(body, etag)
        remaining = deadline - loop.time()
        if remaining <= 0 or waiters.closing:
            return not_modified(named[0] if named is not None else etag)
        # A change made without a message (FLUSHDB, a forced rebuild) wakes nothing: read
        # again at least every cache.ttl_s (the cache's own backstop, as streams do), not
        # only when the wait ends.
        timeout = min(remaining, cache.ttl_s) if cache.live else min(remaining, DEGRADED_POLL_S)
        if expiry is not None:
            timeout = min(timeout, max(expiry - loop.time(), 0.0))
        request[HELD] = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await signal.wake.wait()
        fresh = not signal.wake.is_set()
