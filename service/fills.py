"""Cache misses of GET-by-id read from Redis together: one pipelined round trip per loop turn.

Under churn (offset events changing random batches) a good share of GETs miss the cache, and
a miss read alone costs several times a hit: most of it is the round trip's system calls and
redis-py's per-call work (a pool checkout, a send, a wake-up), not Redis. The misses that
arrive in one turn of the event loop are therefore queued and read with one pipeline
(HGETALL each), which costs a fraction per read.

Exactness is the cache's as before: the generation is noted just before the pipeline is sent
and the rendered body offered to the cache with it, so a change whose invalidation arrives
meanwhile voids that fill. A GET joins another GET's read of the same batch only while that
read is still queued (not sent): a read already on its way may predate a change the joining
request must see.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import cast

import orjson

from core import keys
from core.layout import is_visible, render
from core.packing import unpacked
from core.store import BatchStore
from service.cache import BatchCache, rev_of
from service.request_log import detached

# A batch as read: its rendered body and its hash's `rev` (0 if unknown).
Read = tuple[bytes, int]
# A turn's queue is cut at this many reads (one pipeline each), so a burst cannot build one
# huge reply that holds the loop.
MAX_PIPELINE = 256


class BatchFills:
    def __init__(self, store: BatchStore, cache: BatchCache) -> None:
        self._store = store
        self._cache = cache
        # key -> (pipeline_id, batch_id, future of the rendered body and its hash's rev, or
        # None if absent)
        self._queued: dict[str, tuple[str, str, asyncio.Future[Read | None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def read(self, pipeline_id: str, batch_id: str) -> bytes | None:
        """The batch rendered as the API returns it, None if absent or deleted; stored in the
        cache unless it changed meanwhile."""
        read = await self.read_version(pipeline_id, batch_id)
        return read[0] if read is not None else None

    async def read_version(self, pipeline_id: str, batch_id: str) -> Read | None:
        """As `read`, with the hash's `rev` (0 if unknown): what orders it among the
        versions a stream has sent (service.streams). Always read from Redis after the
        call: never older than anything this process has seen of the batch."""
        key = keys.batch(pipeline_id, batch_id)
        queued = self._queued.get(key)
        if queued is None:
            loop = asyncio.get_running_loop()
            if not self._queued:
                loop.call_soon(self._flush)
            queued = self._queued[key] = (pipeline_id, batch_id, loop.create_future())
            if len(self._queued) >= MAX_PIPELINE:
                self._flush()
        # Shielded: a request that goes away must not cancel the others' read.
        return await asyncio.shield(queued[2])

    def _flush(self) -> None:
        if not self._queued:
            return
        reads, self._queued = self._queued, {}
        task = detached(self._fill(reads))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fill(self, reads: dict[str, tuple[str, str, asyncio.Future[Read | None]]]) -> None:
        cache = self._cache
        generation = cache.generation
        try:
            if len(reads) == 1:
                # A lone miss: a pipeline's own bookkeeping would cost more than it saves.
                [key] = reads
                hashes = [cast(dict[str, str], await self._store.redis.hgetall(key))]
            else:
                async with self._store.redis.pipeline(transaction=False) as pipe:
                    for key in reads:
                        pipe.hgetall(key)
                    hashes = cast(list[dict[str, str]], await pipe.execute())
        except BaseException as exc:
            for _, _, future in reads.values():
                if future.done():
                    continue
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                    # Every waiter may have gone away; the error is theirs, not the task's.
                    future.exception()
                else:
                    future.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        for (key, (_, _, future)), fields in zip(reads.items(), hashes, strict=True):
            if future.done():
                continue
            if not is_visible(fields):
                future.set_result(None)
                continue
            try:
                body = orjson.dumps(render(unpacked(fields)))
            except Exception as exc:  # a malformed hash: that request's 500, not everyone's
                future.set_exception(exc)
                future.exception()
                continue
            rev = rev_of(fields)
            cache.put(key, body, generation, rev)
            future.set_result((body, rev))


_FILLS: weakref.WeakKeyDictionary[BatchStore, BatchFills] = weakref.WeakKeyDictionary()


def fills_of(store: BatchStore, cache: BatchCache) -> BatchFills:
    """The app's reader of cache misses (one per store: one per application)."""
    fills = _FILLS.get(store)
    if fills is None:
        fills = _FILLS[store] = BatchFills(store, cache)
    return fills
