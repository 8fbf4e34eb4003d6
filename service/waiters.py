"""Requests held until a batch changes, and streams fed by every change: the cache's feed.

Three kinds of waiter, all fed by the cache's change feed (`BatchCache.on_change`), so a held
request or an open stream costs no Redis traffic while nothing changes:

- a batch's stream takes every version of its batch in order (`follow`: a `BatchFeed`), and
  a long-poll GET of it waits on the same kind of feed;
- a pipeline's stream takes the latest version of each changed batch (`watch`).

A change message that carries the batch's new hash is rendered once, whatever the number of
streams, and handed to each as a `Version` (the GET's body, its ETag, whether it is `stop`:
all computed once); a message without one (a delete, a create) hands over READ: read the
batch. A waiter registers before it reads, so a change between its
read and its wait still reaches it. A reset of the cache (the feed lost or resubscribed:
changes may have been missed) wakes everyone, and each re-reads. Queues are bounded: a
stream that falls behind is marked `overflow` and cut off by its handler.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import TypeVar

import orjson

from core import keys
from service.cache import etag_of, published_body, published_rev

log = logging.getLogger(__name__)
T = TypeVar("T")

# A stream this many changes behind is cut off (its client is not reading): memory per
# stream stays bounded.
MAX_PENDING = 1000
READ = object()  # in a feed: "read the batch" (a change that carried no hash, or a reset)
GONE = object()  # in a feed: the batch is hidden or deleted


@dataclass(frozen=True, slots=True)
class Version:
    """One version of a batch as every stream sends it, worked out once for all of them;
    `rev` (the hash's, 0 if unknown) orders it: the feed may deliver it after a read that
    saw a newer one, and a stream never sends a version older than one it sent."""

    body: bytes
    etag: str
    stopped: bool
    rev: int

    @classmethod
    def of(cls, body: bytes, etag: str | None = None, rev: int = 0) -> Version:
        stopped = orjson.loads(body)["state"]["state"] == "stop"
        return cls(body, etag if etag is not None else etag_of(body), stopped, rev)

    def not_after(self, rev: int) -> bool:
        """Not after a version of `rev` (both known): already sent, or superseded."""
        return 0 < self.rev <= rev


class BatchFeed:
    """Every version of one batch since the stream last looked, oldest first, bounded."""

    def __init__(self, max_pending: int | None = None, *, long_poll: bool = False) -> None:
        self.wake = asyncio.Event()
        self.long_poll = long_poll  # held by a GET, not a stream (for the metrics)
        self.items: deque[Version | object] = deque()
        self._max = max_pending if max_pending is not None else MAX_PENDING
        self.overflow = False

    def add(self, item: Version | object) -> None:
        if len(self.items) >= self._max:
            self.overflow = True
        else:
            self.items.append(item)
        self.wake.set()

    def take(self) -> list[Version | object]:
        taken = list(self.items)
        self.items.clear()
        self.wake.clear()
        return taken


class PipelineWatch:
    """The batches of one pipeline changed since the stream last looked (key -> its latest
    body, or READ / GONE), bounded."""

    def __init__(self, max_pending: int | None = None, *, long_poll: bool = False) -> None:
        self.wake = asyncio.Event()
        self.long_poll = long_poll  # held by a GET of the latest batch, not a stream
        self._pending: dict[str, Version | object] = {}  # in the order they first changed
        self._max = max_pending if max_pending is not None else MAX_PENDING
        self.overflow = False  # fell too far behind: cut off
        self.everything = False  # a reset: anything may have changed

    def add(self, key: str | None, item: Version | object = READ) -> None:
        if key is None:
            self.everything = True
        elif key in self._pending or len(self._pending) < self._max:
            self._pending[key] = item
        else:
            self.overflow = True
        self.wake.set()

    def take(self) -> list[tuple[str, Version | object]]:
        """The changed keys with their latest item, oldest change first; forgets them."""
        taken = list(self._pending.items())
        self._pending.clear()
        self.everything = False
        self.wake.clear()
        return taken


class ChangeWaiters:
    def __init__(self) -> None:
        self._feeds: dict[str, set[BatchFeed]] = {}
        self._watches: dict[str, set[PipelineWatch]] = {}
        self.closing = False

    def close(self) -> None:
        """The app is shutting down: every held request and stream is woken to end (a stream
        would otherwise hold the shutdown until its next write finds the client gone)."""
        self.closing = True
        self.changed(None, None)

    def __len__(self) -> int:
        return sum(len(group) for table in (self._feeds, self._watches)
                   for group in table.values())

    def counts(self) -> dict[str, int]:
        """Open waiters by kind: held long-polls, batch streams, pipeline streams."""
        polls = sum(feed.long_poll for feeds in self._feeds.values() for feed in feeds)
        latest = sum(watch.long_poll for watches in self._watches.values() for watch in watches)
        return {"long_poll": polls + latest,
                "batch_stream": sum(len(feeds) for feeds in self._feeds.values()) - polls,
                "pipeline_stream": sum(len(watches) for watches in self._watches.values())
                - latest}

    def follow(self, key: str, *, long_poll: bool = False) -> BatchFeed:
        """Every later version of the batch under `key`; `unfollow` it when done."""
        feed = BatchFeed(long_poll=long_poll)
        self._feeds.setdefault(key, set()).add(feed)
        return feed

    def unfollow(self, key: str, feed: BatchFeed) -> None:
        _remove(self._feeds, key, feed)

    def watch(self, pipeline_id: str, *, long_poll: bool = False) -> PipelineWatch:
        """The changes of every batch of `pipeline_id`; `unwatch` it when done."""
        watch = PipelineWatch(long_poll=long_poll)
        self._watches.setdefault(pipeline_id, set()).add(watch)
        return watch

    def unwatch(self, pipeline_id: str, watch: PipelineWatch) -> None:
        _remove(self._watches, pipeline_id, watch)

    def changed(self, key: str | None, published: str | None) -> None:
        """The cache's `on_change`: `key` changed (to `published`, when the message carried
        the hash), or (None) anything may have."""
        if not (self._feeds or self._watches):
            return
        if key is None:
            for every_feed in self._feeds.values():
                for feed in every_feed:
                    feed.add(READ)
            for every_watch in self._watches.values():
                for watch in every_watch:
                    watch.add(None)
            return
        feeds = self._feeds.get(key)
        ids = keys.batch_ids(key) if self._watches else None
        watches = self._watches.get(ids[0]) if ids is not None else None
        if not feeds and not watches:
            return
        item = _item(key, published)  # rendered once for every stream
        for feed in feeds or ():
            feed.add(item)
        for watch in watches or ():
            watch.add(key, item)


def _item(key: str, published: str | None) -> Version | object:
    if published is None:
        return READ
    try:
        body = published_body(published)
    except Exception:  # malformed: the streams read the batch instead
        log.exception("a published batch hash could not be rendered (%s)", key)
        return READ
    return GONE if body is None else Version.of(body, rev=published_rev(published))


def _remove(table: dict[str, set[T]], key: str, member: T) -> None:
    group = table.get(key)
    if group is not None:
        group.discard(member)
        if not group:
            del table[key]
