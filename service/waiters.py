"""Long-poll GETs held until their batch changes, woken by the cache's change feed.

A held request registers before it reads the batch, so a change between its read and its
wait still wakes it. The feed is the cache's (`BatchCache.on_change`): a held request costs
no Redis traffic while it waits. A reset of the cache (the feed lost or resubscribed: changes
may have been missed) wakes everyone, and each re-reads.
"""

from __future__ import annotations

import asyncio


class ChangeWaiters:
    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Future[None]]] = {}

    def __len__(self) -> int:
        return sum(len(futures) for futures in self._waiting.values())

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

    def changed(self, key: str | None) -> None:
        """The cache's `on_change`: one key changed, or (None) anything may have."""
        if not self._waiting:
            return
        if key is None:
            woken = [f for futures in self._waiting.values() for f in futures]
            self._waiting.clear()
        else:
            woken = list(self._waiting.pop(key, ()))
        for future in woken:
            if not future.done():
                future.set_result(None)
