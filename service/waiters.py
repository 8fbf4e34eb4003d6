"""Requests held until a batch changes, woken by the cache's change feed.

Two kinds: a long-poll GET or a batch's stream waits on one batch key (a future per wait); a
pipeline's stream watches every batch of its pipeline (`PipelineWatch`: the keys changed
since it last looked). A waiter registers before it reads, so a change between its read and
its wait still wakes it. The feed is the cache's (`BatchCache.on_change`): a held request
costs no Redis traffic while it waits. A reset of the cache (the feed lost or resubscribed:
changes may have been missed) wakes everyone, and each re-reads.
"""

from __future__ import annotations

import asyncio

from core import keys

# A pipeline stream that falls this many changed batches behind is cut off (its client is
# not reading): memory per stream stays bounded.
MAX_PENDING = 1000


class PipelineWatch:
    """The batches of one pipeline changed since the stream last looked, bounded."""

    def __init__(self, max_pending: int | None = None) -> None:
        self.wake = asyncio.Event()
        self._pending: dict[str, None] = {}  # batch keys, in the order they first changed
        self._max = max_pending if max_pending is not None else MAX_PENDING
        self.overflow = False  # fell too far behind: cut off
        self.everything = False  # a reset: anything may have changed

    def add(self, key: str | None) -> None:
        if key is None:
            self.everything = True
        elif key not in self._pending:
            if len(self._pending) >= self._max:
                self.overflow = True
            else:
                self._pending[key] = None
        self.wake.set()

    def take(self) -> list[str]:
        """The changed keys, oldest first, and forgets them."""
        taken = list(self._pending)
        self._pending.clear()
        self.everything = False
        self.wake.clear()
        return taken


class ChangeWaiters:
    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Future[None]]] = {}
        self._watches: dict[str, set[PipelineWatch]] = {}

    def __len__(self) -> int:
        return (sum(len(futures) for futures in self._waiting.values())
                + sum(len(watches) for watches in self._watches.values()))

    def register(self, key: str) -> asyncio.Future[None]:
        """A future resolved at the next change of `key` (or reset); `discard` it when done."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, set()).add(future)
        return future

    def discard(self, key: str, future: asyncio.Future[None]) -> None:
        futures = self._waiting.get(key)
        if futures is not None:
            futures.discard(future)
            if not futures:
                del self._waiting[key]
        future.cancel()

    def watch(self, pipeline_id: str) -> PipelineWatch:
        """Collects the changes of every batch of `pipeline_id`; `unwatch` it when done."""
        watch = PipelineWatch()
        self._watches.setdefault(pipeline_id, set()).add(watch)
        return watch

    def unwatch(self, pipeline_id: str, watch: PipelineWatch) -> None:
        watches = self._watches.get(pipeline_id)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._watches[pipeline_id]

    def changed(self, key: str | None) -> None:
        """The cache's `on_change`: one key changed, or (None) anything may have."""
        if self._waiting:
            if key is None:
                woken = [f for futures in self._waiting.values() for f in futures]
                self._waiting.clear()
            else:
                woken = list(self._waiting.pop(key, ()))
            for future in woken:
                if not future.done():
                    future.set_result(None)
        if self._watches:
            if key is None:
                for watches in self._watches.values():
                    for watch in watches:
                        watch.add(None)
            elif (ids := keys.batch_ids(key)) is not None:
                for watch in self._watches.get(ids[0], ()):
                    watch.add(key)
