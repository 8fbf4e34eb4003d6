"""An in-process cache of rendered batch objects, kept exact by Redis change notifications.

Every script that changes a batch hash publishes the hash's key on `keys.CHANGES_CHANNEL`; this
cache listens and evicts. It serves only while its subscription is live: on a lost connection
it empties itself and stays off until it has subscribed again, so it never serves a value
whose invalidation it might have missed. A read that raced an invalidation is not stored
(the generation counter moved while the read was in flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict

from redis.asyncio import Redis

log = logging.getLogger(__name__)


class BatchCache:
    def __init__(self, max_entries: int = 50_000) -> None:
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._max = max_entries
        self.generation = 0
        self.live = False
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> bytes | None:
        if not self.live:
            return None
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, value: bytes, generation: int) -> None:
        """Stores a value read while `generation` was current, unless something changed since."""
        if not self.live or generation != self.generation:
            return
        self._entries[key] = value
        if len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def evict(self, key: str) -> None:
        self.generation += 1
        self._entries.pop(key, None)

    def reset(self, live: bool) -> None:
        self.generation += 1
        self._entries.clear()
        self.live = live

    async def follow(self, redis: Redis, channel: str) -> None:
        """Runs until cancelled: subscribes, evicts on every message, resubscribes on errors."""
        delay = 0.2
        while True:
            pubsub = redis.pubsub()
            try:
                await pubsub.subscribe(channel)
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        # Only now is every later change certain to reach us.
                        self.reset(live=True)
                        delay = 0.2
                    elif message["type"] == "message":
                        self.evict(message["data"])
            except Exception as exc:
                log.warning("cache invalidation feed lost (%s); cache off until resubscribed",
                            type(exc).__name__)
            finally:
                self.reset(live=False)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            # Only a lost feed gets here (cancellation propagates out of the loop).
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
