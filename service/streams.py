"""A batch as a push stream (Server-Sent Events), in the shape of its GET.

`GET /api/v1/batches/{pipeline_id}/{batch_id}` with `Accept: text/event-stream`: first the
batch as GET returns it, then one `event: batch` per change, each with `id:` the body's ETag
(it changes exactly when the body does; `Last-Event-ID` with the current one sends nothing
until the next change) and `data:` exactly the GET's JSON. Once the batch is `stop` and
has stayed unchanged for `END_QUIET_S` (its outcome can still be settled by a later stop
event), `event: end` follows its last object and the stream closes; a deleted batch sends
`event: deleted` and closes. A comment line every `KEEPALIVE_S` keeps proxies from closing an
idle stream.

Versions are ordered by the batch hash's `rev`: the feed can deliver a change after a read
that saw it or a newer one (service.cache), so a stream never sends a version whose rev is not
above the last one it sent (of that batch), save a read from Redis made now, which is the
truth. A change made without a message (FLUSHDB, a forced rebuild) wakes nothing: every
stream reads from Redis again at least every `cache.ttl_s`, the GET cache's own backstop.

Every stream of a process waits on the cache's change feed (`service.waiters`): one Redis
subscription per API process, never one per client, and the batch is read through the cache,
so a change costs one read (or none) whatever the number of watchers. A client is sent the
latest state, never a backlog: a slow one skips intermediate states, and one that does not
take a write within `WRITE_TIMEOUT_S` is cut off, so memory does not grow with slow readers.

Which requests get a stream (`wants_stream`), the events' framing and the timing (keep-alive,
backstop, write timeout) are shared with a pipeline's stream (service.pipeline_stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import zlib
from typing import Final

from aiohttp import web

from core.retry import describe
from service.appkeys import CACHE, WAITERS
from service.auth import until_expiry
from service.conditional import VersionedRead, current
from service.errors import ApiError
from service.waiters import GONE, READ, BatchFeed, Version

log = logging.getLogger(__name__)

# In a batch stream's queue: read the batch from Redis now, not from the cache (the backstop
# for changes made without a message).
FRESH: Final = object()
END: Final = object()  # a stream's deadline: the stopped batch was quiet for END_QUIET_S

KEEPALIVE_S: Final = 15.0
# A stopped batch can still change (a later stop event decides its outcome and reason, the
# run's end arrives from several sources): `end` follows the last version once the batch has
# been quiet this long, so the stream's last object is the batch's final one.
END_QUIET_S: Final = 2.0
WRITE_TIMEOUT_S: Final = 10.0
# While the change feed is down nothing wakes a stream: it re-reads this often instead.
DEGRADED_POLL_S: Final = 1.0
# RFC 9110 12.4.2's qvalue: 0 to 1, three decimals at most.
_QVALUE: Final = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")
STREAM_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                         "X-Accel-Buffering": "no"}


def wants_stream(request: web.Request) -> bool:
    """A GET whose Accept lists `text/event-stream` as acceptable (q above 0) and not below
    `application/json` (or the wildcard covering it). Never a HEAD: its answer has no body
    (RFC 9110 9.3.2), and a stream's headers promise one that never ends, which a client
    reusing the connection would read as its next answer; a HEAD gets the plain GET's
    headers (aiohttp sends them bodiless)."""
    accept = request.headers.get("Accept", "")
    # Most GETs name no stream: answered without parsing (this is on the cached GET's path).
    if "event-stream" not in accept.lower() or request.method != "GET":
        return False
    ranges = _accepted(accept)
    sse = ranges.get("text/event-stream", 0.0)
    # JSON's weight from its most specific range (RFC 9110 12.5.1): `*/*` covers it too.
    json = ranges.get("application/json", ranges.get("application/*", ranges.get("*/*", 0.0)))
    return sse > 0 and sse >= json


def _accepted(accept: str) -> dict[str, float]:
    """The media types an Accept header lists, each with its weight (the highest given);
    a malformed weight counts 0: such a range is not taken as acceptable."""
    weights: dict[str, float] = {}
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        weight = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                weight = float(value) if _QVALUE.fullmatch(value.strip()) else 0.0
        media = media.lower()
        weights[media] = max(weight, weights.get(media, 0.0))
    return weights


def event(name: str, data: bytes, event_id: str | None = None) -> bytes:
    head = f"event: {name}\n" + (f"id: {event_id}\n" if event_id is not None else "")
    return head.encode() + b"data: " + data + b"\n\n"


async def stream_batch(request: web.Request, key: str,
                       read: VersionedRead) -> web.StreamResponse:
    """Streams the batch cached under `key`; `read` gives its current body and rev, read
    from Redis (404 if none)."""
    waiters = request.app[WAITERS]
    feed = waiters.follow(key)  # before the first read: every later version reaches us
    try:
        # A Last-Event-ID the cache does not hold may be newer than its entry (another API
        # process sent it): then read from Redis (service.conditional.current).
        first = Version.of(*await current(request, key, read,  # 404 before any byte is sent
                                          request.headers.get("Last-Event-ID")))
        response = web.StreamResponse(headers=STREAM_HEADERS)
        await response.prepare(request)
        try:
            async with until_expiry(request):
                await _send_versions(request, response, key, read, feed, first)
        except (ConnectionError, TimeoutError):
            # Gone, not taking writes (WRITE_TIMEOUT_S), or its token expired: cut off.
            cut_off(request)
            return response
        except Exception as exc:  # Redis gone mid-stream, say: the 200 is sent already
            cut_off(request, key, exc)
            return response
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response
    finally:
        waiters.unfollow(key, feed)


def cut_off(request: web.Request, what: str | None = None,
            exc: BaseException | None = None) -> None:
    """Ends a stream whose 200 has been sent. Only closing the connection can say it ended
    badly: an error answered now would be written as bytes inside its body, which breaks
    every client. The client reconnects with Last-Event-ID."""
    if exc is not None:
        log.warning("stream of %s cut: %s", what, describe(exc))
    if request.transport is not None:
        request.transport.close()


async def _send_versions(request: web.Request, response: web.StreamResponse, key: str,
                         read: VersionedRead, feed: BatchFeed, first: Version) -> None:
    cache = request.app[CACHE]
    loop = asyncio.get_running_loop()
    sent, sent_rev = request.headers.get("Last-Event-ID"), 0
    pending: list[Version | object] = [first]
    # A change made without a message (FLUSHDB, a forced rebuild) wakes nothing: the batch
    # is read from Redis again at least every cache.ttl_s, the GET cache's own backstop.
    fresh_by = backstop_due(cache.ttl_s, key)
    stopped = False  # the batch reached `stop`: `end` once it has been quiet for END_QUIET_S
    changed_at = written_at = loop.time()  # when the last version, anything, was sent
    while True:
        for item in pending:
            fresh = item is FRESH
            if fresh:
                fresh_by = backstop_due(cache.ttl_s, key)
            if item is READ or fresh:
                try:
                    item = Version.of(*(await _read_now(request, read) if fresh
                                        else await current(request, key, read)))
                except ApiError as exc:
                    if exc.status != 404:
                        raise
                    item = GONE
            if item is GONE:
                await write(response, event("deleted", b"{}"))
                return
            assert isinstance(item, Version)
            # A message can arrive after a read that saw its change or a newer one: never
            # an older version, never one again. A read from Redis now is the truth, even
            # of a lower rev (a rebuild may restore one).
            if not fresh and item.not_after(sent_rev):
                continue
            if item.etag != sent:
                await write(response, event("batch", item.body, item.etag))
                sent, changed_at = item.etag, loop.time()
                written_at = changed_at
            sent_rev = item.rev
            stopped = item.stopped
        if feed.overflow:
            raise TimeoutError("the client fell too far behind")
        if request.app[WAITERS].closing:
            return  # shutting down: the client reconnects (Last-Event-ID) elsewhere
        # Whichever comes first: `end` (stopped, and quiet since), the backstop's read (or,
        # the feed down, a read every DEGRADED_POLL_S: nothing wakes us), a keep-alive once
        # nothing was written for KEEPALIVE_S.
        deadlines = [(changed_at + END_QUIET_S if stopped else math.inf, END),
                     (fresh_by if cache.live else loop.time() + DEGRADED_POLL_S, FRESH),
                     (written_at + KEEPALIVE_S, None)]
        deadline, due = min(deadlines, key=lambda pair: pair[0])
        try:
            async with asyncio.timeout_at(deadline):
                await feed.wake.wait()
        except TimeoutError:
            if due is END:
                await write(response, event("end", b"{}"))
                return
            if due is None:
                await write(response, b": keep-alive\n\n")
                written_at = loop.time()
            pending = [FRESH] if due is FRESH else []
            continue
        pending = feed.take()
        if loop.time() >= fresh_by:
            pending.append(FRESH)


def backstop_due(ttl_s: float, key: str) -> float:
    """When a stream of `key` (a batch's or a pipeline's) next reads from Redis for changes
    made without a message: the first instant after now of a grid of step `ttl_s` on the
    loop's clock, shifted by a phase drawn from `key`. The streams of one batch meet at the
    same instant and join one read (service.fills) instead of each costing one; the
    streams of different batches are spread over the period instead of all reading at
    once. Now counts a millisecond later: a timer can fire a clock tick before its deadline."""
    if math.isinf(ttl_s):
        return math.inf
    phase = zlib.crc32(key.encode()) / 2**32 * ttl_s
    now = asyncio.get_running_loop().time() + 0.001
    return (math.floor((now - phase) / ttl_s) + 1) * ttl_s + phase


async def _read_now(request: web.Request, read: VersionedRead) -> tuple[bytes, None, int]:
    body, rev = await read(request)
    return body, None, rev


async def write(response: web.StreamResponse, data: bytes) -> None:
    """One write, cut off when the client does not take it in time."""
    async with asyncio.timeout(WRITE_TIMEOUT_S):
        await response.write(data)
