"""A pipeline's batches as a push stream (`GET /api/v1/batches/{pipeline_id}/` with
`Accept: text/event-stream`; framing and timing: service.streams).

The newest `limit` batches first, as the list's first page (nothing falls between a list read
and the stream), then one `event: batch` per change of any batch of the pipeline, new ones
and those beyond the page included, and `event: deleted` (data `{"id": ...}`) for a deleted
one. A client that falls `waiters.MAX_PENDING` changed batches behind is cut off.

After a reset of the feed (changes may have been missed; the backstop, every `cache.ttl_s`,
is one too) the stream reads Redis for what it has not been told: `deleted` for each batch it
had sent (the last MAX_SENT) that left the index meanwhile, each one it had sent beyond the
page whose `rev` moved meanwhile or that is running (CHANGED_MEANWHILE: one script answers
all three; the client's live list still shows them; a running one may have gone `stalled` at
the same rev), then the page again, oldest first, each only if it changed since sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Final

import orjson
from aiohttp import web
from redis.asyncio import Redis

from core import keys
from core.paging import pipeline_known
from core.store import BatchStore
from service.appkeys import CACHE, STORE, WAITERS
from service.auth import until_expiry
from service.cache import etag_of
from service.errors import not_found
from service.fills import fills_of
from service.streams import (
    DEGRADED_POLL_S,
    KEEPALIVE_S,
    STREAM_HEADERS,
    backstop_due,
    cut_off,
    event,
    write,
)
from service.waiters import GONE, READ, Version

# Deleted batches a pipeline stream remembers having announced (a delete publishes twice).
MAX_GONE: Final = 10_000
# Batches a pipeline stream remembers having sent, the most recently sent kept: after a reset
# of the feed, those that left the index are announced deleted and those whose rev moved are
# sent again (changes missed while the feed was down). One sent longer ago than the last
# MAX_SENT is not checked.
MAX_SENT: Final = 10_000

# The backstop's periodic check (every cache.ttl_s, for changes made without a message:
# FLUSHDB, a forced rebuild) covers the batches sent most recently only; a real reset of the
# feed checks all MAX_SENT. Every open stream runs it: over 10,000 sent batches it cost some
# 23 ms a stream each time.
BACKSTOP_CHECKED: Final = 200

# Batches checked per CHANGED_MEANWHILE call: ~1.5 ms of Redis each, so a stream that sent
# MAX_SENT does not hold Redis (single-threaded) for long at once.
CHECK_CHUNK: Final = 1_000

# KEYS[1] the pipeline's batch index, KEYS[2..] hashes of batches a stream sent (one slot on
# Redis Cluster: they share the pipeline's hash tag)
# ARGV: per hash (in the order of KEYS), its batch id and the rev the stream sent
# Returns {ids out of the index, ids in it whose rev is not the one sent, ids at that rev
# whose batch is running}. Out of the index: hidden or purged (both leave it in the same
# script). A rev that moved is a change missed; a lower one too (a rebuild may restore it:
# Redis is the truth); a hash without one reads as 0. A running batch's body can change at
# the same rev (a step's `stalled` is decided when rendered): the caller reads it and
# compares ETags. A script rather than a pipeline of HGETs: the client's per-command cost was
# 11 µs of CPU a batch, this 2 µs (the ZMSCORE alone it replaces: 0.7 µs).
CHANGED_MEANWHILE: Final = """
local deleted, moved, running = {}, {}, {}
for i = 2, #KEYS do
  local id = ARGV[2 * i - 3]
  if not redis.call('ZSCORE', KEYS[1], id) then deleted[#deleted + 1] = id
  else
    local f = redis.call('HMGET', KEYS[i], 'rev', 'state')
    if (f[1] or '0') ~= ARGV[2 * i - 2] then moved[#moved + 1] = id
    elseif f[2] == 'running' then running[#running + 1] = id
    end
  end
end
return {deleted, moved, running}
"""

Changes = list[tuple[str, Version | object]]  # batch keys to send, each a body, READ or GONE
# What a stream sent of a batch: its rev, and its ETag (a body can change at the same rev: a
# step's `stalled` is decided when it is rendered).
Sent = tuple[int, str]


async def stream_pipeline(request: web.Request, pipeline_id: str,
                          limit: int) -> web.StreamResponse:
    """The pipeline's stream (the module's docstring). An unknown pipeline is a 404, as its
    list is."""
    store = request.app[STORE]
    cache = request.app[CACHE]
    loop = asyncio.get_running_loop()
    fills = fills_of(store, cache)
    waiters = request.app[WAITERS]
    watch = waiters.watch(pipeline_id)  # before the first read: no change falls between
    try:
        page = await store.page(pipeline_id, limit, None)
        if not page.items and not await pipeline_known(store.redis, pipeline_id):
            raise not_found(f"unknown pipeline {pipeline_id}")  # as the list says it
        # Read again with their revs (one pipelined round trip): what orders the versions the
        # feed then delivers, which can be older than these reads (service.cache).
        first = await asyncio.gather(*(fills.read_version(pipeline_id, b) for b in page.items))
        response = web.StreamResponse(headers=STREAM_HEADERS)
        await response.prepare(request)
        gone: set[str] = set()
        # ids sent as `batch` (not since `deleted`) -> what was sent: oldest first
        sent: dict[str, Sent] = {}
        try:
            async with until_expiry(request):  # its token's life
                for batch_id, read in zip(page.items, first, strict=True):
                    if read is not None:  # else gone since the page's read: never sent
                        etag = etag_of(read[0])
                        await write(response, event("batch", read[0], etag))
                        _remember(sent, batch_id, read[1], etag)
                fresh_by = backstop_due(cache.ttl_s, pipeline_id)
                # From the last keep-alive, not from each wake-up: the backstop's reads (every
                # cache.ttl_s, shorter than KEEPALIVE_S) must not put the keep-alive off for ever.
                keep_alive_at = loop.time() + KEEPALIVE_S
                backstop_only = False
                while True:
                    # A change made without a message (FLUSHDB, a forced rebuild) wakes nothing:
                    # the page is read again at least every cache.ttl_s, as after a reset;
                    # every DEGRADED_POLL_S while the feed is down (nothing wakes us then).
                    due = fresh_by if cache.live else min(fresh_by,
                                                          loop.time() + DEGRADED_POLL_S)
                    try:
                        async with asyncio.timeout_at(min(keep_alive_at, due)):
                            await watch.wake.wait()
                    except TimeoutError:
                        if loop.time() >= keep_alive_at:
                            await write(response, b": keep-alive\n\n")
                            keep_alive_at = loop.time() + KEEPALIVE_S
                        if loop.time() < due:
                            continue
                        fresh_by = backstop_due(cache.ttl_s, pipeline_id)
                        backstop_only = not watch.everything  # else a real reset is pending too
                        watch.add(None)
                    if watch.overflow:
                        raise TimeoutError("the client fell too far behind")
                    if waiters.closing:
                        break
                    if watch.everything:  # changes may have been missed: Redis says which
                        depth = BACKSTOP_CHECKED if backstop_only else MAX_SENT
                        changed = await _after_reset(store, pipeline_id, limit, sent, watch.take(),
                                                     depth)
                    else:
                        changed = watch.take()
                    backstop_only = False
                    for key, item in changed:
                        ids = keys.batch_ids(key)
                        if ids is None:
                            continue
                        # Read from Redis now: the truth, even of a lower rev (a rebuild may
                        # restore one). So is a batch this stream has not sent: nothing orders
                        # the feed's (maybe late) version after what the client was shown by
                        # another API process, whose feed is ahead of this one's.
                        fresh = item is READ or (isinstance(item, Version)
                                                 and ids[1] not in sent)
                        if fresh:
                            read = await fills.read_version(*ids)
                            item = Version.of(read[0], rev=read[1]) if read is not None else GONE
                            if (isinstance(item, Version) and item.rev > 0
                                    and (item.rev, item.etag) == sent.get(ids[1])):
                                continue  # sent already
                        if item is GONE:
                            sent.pop(ids[1], None)
                            if ids[1] in gone:  # hidden, then purged: said once
                                continue
                            if len(gone) >= MAX_GONE:
                                gone.clear()
                            gone.add(ids[1])
                            await write(response, event("deleted", orjson.dumps({"id": ids[1]})))
                        else:
                            assert isinstance(item, Version)
                            # A message can arrive after a read that saw a newer version.
                            if not fresh and item.not_after(sent.get(ids[1], (0, ""))[0]):
                                continue
                            await write(response, event("batch", item.body, item.etag))
                            _remember(sent, ids[1], item.rev, item.etag)
        except (ConnectionError, TimeoutError):
            cut_off(request)
        except Exception as exc:  # Redis gone mid-stream, say: the 200 is sent already
            cut_off(request, f"pipeline {pipeline_id}", exc)
        return response
    finally:
        waiters.unwatch(pipeline_id, watch)


async def _after_reset(store: BatchStore, pipeline_id: str, limit: int,
                       sent: Mapping[str, Sent], taken: Changes, depth: int = MAX_SENT
                       ) -> Changes:
    """What to send after a reset, oldest first: `deleted` for the batches sent that left
    the index, the batches sent beyond the page whose rev moved or that run, the page (each
    read now, sent only if changed), then what the feed delivered besides (`taken`: a change of a
    batch never sent, beyond the page, must not be dropped with the reset). Of the batches
    sent, the `depth` most recent are checked."""
    page = (await store.page(pipeline_id, limit, None)).items
    recent = dict(list(sent.items())[-depth:]) if len(sent) > depth else sent
    deleted, moved, running = await _changed_meanwhile(store.redis, pipeline_id, recent, page)
    changed: Changes = [(keys.batch(pipeline_id, b), GONE) for b in deleted]
    changed += [(keys.batch(pipeline_id, b), READ)
                for b in [*moved, *running, *reversed(page)]]
    listed = {key for key, _ in changed}
    return changed + [(key, item) for key, item in taken if key not in listed]


def _remember(sent: dict[str, Sent], batch_id: str, rev: int, etag: str) -> None:
    """`batch_id` was just sent at `rev` with `etag`: the most recent of `sent`, which keeps
    MAX_SENT at most."""
    sent.pop(batch_id, None)
    if len(sent) >= MAX_SENT:
        del sent[next(iter(sent))]
    sent[batch_id] = (rev, etag)


async def _changed_meanwhile(redis: Redis, pipeline_id: str, sent: Mapping[str, Sent],
                             page: Mapping[str, Any]
                             ) -> tuple[list[str], list[str], list[str]]:
    """Among the batches sent that are not on the page just read: those out of the batch
    index, those in it whose `rev` is not the one sent, and those at that rev that run
    (CHANGED_MEANWHILE), CHECK_CHUNK at a time; no call when the page holds them all. One
    only pushed off the page by newer batches is still indexed, and unchanged."""
    off_page = [batch_id for batch_id in sent if batch_id not in page]
    script = redis.register_script(CHANGED_MEANWHILE)
    deleted: list[str] = []
    moved: list[str] = []
    running: list[str] = []
    for at in range(0, len(off_page), CHECK_CHUNK):
        chunk = off_page[at:at + CHECK_CHUNK]
        gone, changed, runs = await script(
            keys=[keys.batch_index(pipeline_id), *(keys.batch(pipeline_id, b) for b in chunk)],
            args=[x for batch_id in chunk for x in (batch_id, sent[batch_id][0])])
        deleted += gone
        moved += changed
        running += runs
    return deleted, moved, running
