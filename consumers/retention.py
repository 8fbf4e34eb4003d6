"""The retention sweeper: finished batches removed `DHUB_BATCH_RETENTION_DAYS` after their stop.

Each pipeline keeps a finished index (`keys.batch_finished_index`: batch id -> the unix time
APPLY_EVENTS saw it reach `stop`; hide and purge take a batch out). A round reads, per
registered pipeline (`keys.PIPELINES`: the registry's few ids, so no second global set to keep
in step), only the expired entries — `ZRANGEBYSCORE -inf <now - retention> LIMIT n` — and for
each writes the snapshot topic's tombstone, then purges the batch (`BatchStore.purge`: its
hash, seen ids, every index entry, and the change message that evicts it from the API's
caches). A round costs O(pipelines + log n + expired), whatever the history.

Every step is idempotent (a tombstone again, a purge of a purged batch), so any number of
sweepers may run, one per events process, with no lock. The tombstone goes first: a sweeper
dying between the two leaves the batch indexed, and the next round does both again; the other
order could leave a snapshot nothing would ever tombstone. A late event's snapshot racing
the tombstone could still bring the batch back in a rebuild: it comes back stopped and old,
and is swept again (the rebuilt finished index is filled from the hashes, `backfill`).

Stopped batches from before the finished index (or restored by a rebuild, which writes hashes
only) are indexed once per pipeline from its `stop` state index, scored by their
`updated_at` (their last change, at or after their stop), then the marker
`keys.batch_finished_indexed` is set.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import cast

from redis.asyncio import Redis

from consumers.plumbing.options import ConsumerOptions
from consumers.plumbing.part import Clients, Part
from core import keys
from core.retry import describe
from core.settings import Settings
from core.snapshots import SnapshotWriter
from core.store import BatchStore

log = logging.getLogger(__name__)
DAY_S = 86_400


class RetentionSweeper(Part):
    name = "retention"

    def __init__(self, settings: Settings, options: ConsumerOptions | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.settings = settings
        self.options = options or ConsumerOptions()
        self._clock = clock  # a test's clock: "long ago" without waiting
        self.swept = 0
        self._more = False  # the last round left expired batches behind (its limit)

    async def _open(self, clients: Clients, scope: contextlib.AsyncExitStack) -> None:
        self.redis: Redis = clients.redis
        self.store = BatchStore.from_settings(clients.redis, self.settings)
        self.snapshots = SnapshotWriter(clients.producer, clients.redis,
                                        self.settings.topic_snapshots)

    async def _loop(self) -> None:
        while True:  # a round at start, then one per interval
            try:
                # A round that hit its limit somewhere is followed at once by another.
                while await self.sweep_once() and self._more and not self.stopping.is_set():
                    pass
            except Exception as exc:  # the next round tries again: every step is idempotent
                log.warning("retention sweep failed: %s", describe(exc))
            if await self.sleep(self.options.retention_interval_s):
                return

    async def sweep_once(self) -> int:
        """One round over every pipeline; returns how many batches it removed."""
        days = self.settings.batch_retention_days
        if days <= 0:
            return 0
        cutoff = self._clock() - days * DAY_S
        removed = 0
        self._more = False
        for pipeline_id in sorted(cast(set[str], await self.redis.smembers(keys.PIPELINES))):
            await self.backfill(pipeline_id)
            removed += await self._sweep(pipeline_id, cutoff)
        self.swept += removed
        if removed:
            log.info("retention: removed %d finished batches older than %g days", removed, days)
        return removed

    async def _sweep(self, pipeline_id: str, cutoff: float) -> int:
        """Up to `retention_batch` expired batches of the pipeline (the rest next round)."""
        expired = cast(list[str], await self.redis.zrangebyscore(
            keys.batch_finished_index(pipeline_id), "-inf", cutoff,
            start=0, num=self.options.retention_batch))
        for batch_id in expired:
            await self.snapshots.tombstone(pipeline_id, batch_id)
            await self.store.purge(pipeline_id, batch_id)
        self._more = self._more or len(expired) >= self.options.retention_batch
        return len(expired)

    async def backfill(self, pipeline_id: str) -> None:
        """Indexes the pipeline's stopped batches that predate the finished index, once."""
        marker = keys.batch_finished_indexed(pipeline_id)
        if await self.redis.exists(marker):
            return
        stopped = keys.batch_state_index(pipeline_id, "stop")
        low: float | str = "-inf"
        while True:
            rows = cast(list[tuple[str, float]], await self.redis.zrangebyscore(
                stopped, low, "+inf", start=0, num=500, withscores=True))
            if not rows:
                break
            ids = [batch_id for batch_id, _ in rows]
            await self.store.scripts.backfill_finished(
                keys=[keys.batch_finished_index(pipeline_id),
                      *(keys.batch(pipeline_id, batch_id) for batch_id in ids)], args=ids)
            low = f"({rows[-1][1]:.0f}"  # sequences are distinct integers
        await self.redis.set(marker, "1")
