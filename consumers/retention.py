"""The retention sweeper: finished batches removed `DHUB_BATCH_RETENTION_DAYS` after their stop.

Each pipeline keeps its finished batches' ids in one bucket per UTC hour of their stop
(`keys.batch_finished_hour`: a list, appended by APPLY_EVENTS at the stop, ~30 bytes a
batch), and the hours that have a bucket in a sorted set (`keys.batch_finished_index`). A
round reads, per registered pipeline (`keys.PIPELINES`: the registry's few ids, so no second
global set to keep in step), only the expired hours — a bucket expires whole once its hour
ended the retention ago, so a batch is kept between the retention and the retention plus one
hour — and from each the ids at its head: those whose batch is still there, stopped, not
hidden and created before the bucket's hour ended (a day's margin; not a later batch of a
reused id) get the snapshot topic's tombstone, then are purged (as `BatchStore.purge`: its
hash, seen ids, every index entry, and the change message that evicts it from the API's
caches), in a script that checks again that the batch is still stopped, not hidden and
without a resume noted since (`SWEEP_BATCH`: a DELETE between the check and the purge owns
the batch, whose data its clean-up removes; a resume goes on from it, which is then kept,
its snapshot written again after the tombstone); the others are skipped (a hidden batch is
the delete's clean-up to purge, a gone one was purged). A batch whose data a kept resume
still goes on from (one that ran no step yet, so never took the files over) is kept, and
bucketed again in the current hour: its record is what tells that resume's own resume the
data is there (`_resumes_holding`). Then the ids read leave the bucket (`TRIM_BUCKET`), and
an emptied bucket's hour leaves the index. Hide and purge never touch a bucket. A round
costs O(pipelines + log hours + expired), whatever the history.

Every step is idempotent (a tombstone again, a purge of a purged batch, a trim that finds the
bucket's head changed does nothing), so any number of sweepers may run, one per events
process, with no lock. The tombstone goes first and the trim last: a sweeper dying between
them leaves the ids in their bucket, and the next round does it all again; the other order
could leave a snapshot nothing would ever tombstone. A late event's snapshot read before the
purge and sent after the tombstone is followed by a tombstone of its writer's own (every
snapshot writer tombstones again, once its records are sent, each batch purged meanwhile:
`core.snapshots.SnapshotWriter.tombstone_purged`), and the sweeper tombstones again after its
purge, so a rebuild does not bring the batch back.

Stopped batches in no bucket (from before the buckets, or restored by a rebuild that did not
bucket them) are bucketed once per pipeline by the hour of their `updated_at` (their last
change, at or after their stop), then the marker `keys.batch_finished_indexed` is set
(`core.paging.ensure_finished`, which also deletes the older finished index).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Final, cast

from redis.asyncio import Redis

from consumers.plumbing.creation import mark_deleted
from consumers.plumbing.options import ConsumerOptions
from consumers.plumbing.part import Clients, Part
from core import keys
from core.layout import RESUMED_FROM, STARTED_PREFIX, is_visible
from core.list_scripts import HOURS_LUA, PURGE_LUA
from core.models import batch_id_ms
from core.paging import ensure_finished
from core.retry import describe
from core.settings import Settings
from core.snapshots import SnapshotWriter
from core.store import RESUME_CREATE_WINDOW_S, BatchStore

log = logging.getLogger(__name__)
DAY_S = 86_400
HOUR_S = 3_600

# KEYS as PURGE_BATCH's (batch hash, seen ids, batch index, filter indexes, finished index,
# purge mark), then the batch's resumed-by set; ARGV as PURGE_BATCH's, then ARGV[3] the
# created_at bound of the sweeper's check (`_sweep`), ARGV[4] how many resumes the set held at
# that check, ARGV[5..] those resumes (the same count with other members is a resume noted
# since, another gone).
# PURGE_BATCH's removal (and the resumed-by set's), only while the batch is as the sweeper
# checked it (stopped, not hidden, created before the bound, no resume noted since), in one
# step: a DELETE may hide it, or a resume note itself (then check it is visible), between
# that check and the purge. Returns 1 when purged, else 0.
SWEEP_BATCH: Final = PURGE_LUA + """
local f = redis.call('HMGET', KEYS[1], 'state', 'deleted', 'created_at')
if f[1] ~= 'stop' or f[2] or not ((f[3] or '') < ARGV[3]) then return 0 end
local resumes = KEYS[#KEYS]
if redis.call('SCARD', resumes) ~= tonumber(ARGV[4]) then return 0 end
for i = 5, #ARGV do
  if redis.call('SISMEMBER', resumes, ARGV[i]) == 0 then return 0 end
end
purge(#KEYS - 3, KEYS[#KEYS - 1], resumes)
return 1
"""
# KEYS[1] the pipeline's finished index, ARGV[1] now (ISO-8601), ARGV[2..] batch ids: each
# appended to the finished bucket of now's hour (a batch kept past its retention).
BUCKET: Final = HOURS_LUA + """
for i = 2, #ARGV do finish(KEYS[1], ARGV[i], ARGV[1]) end
return #ARGV - 1
"""


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
        self._sweep_batch = clients.redis.register_script(SWEEP_BATCH)
        self._bucket = clients.redis.register_script(BUCKET)
        self.snapshots = SnapshotWriter(clients.producer, clients.redis,
                                        self.settings.topic_snapshots)

    async def _loop(self) -> None:
        while True:  # a round at start, then one per interval
            try:
                # A round that hit its limit somewhere is followed at once by another, even
                # one that removed nothing: its limit may have gone on ids of batches deleted
                # since (left in their buckets), with expired batches behind them.
                await self.sweep_once()
                while self._more and not self.stopping.is_set():
                    await self.sweep_once()
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
        """Up to `retention_batch` ids of the pipeline's expired buckets (the rest next round)."""
        budget = self.options.retention_batch
        hours = cast(list[tuple[str, float]], await self.redis.zrangebyscore(
            keys.batch_finished_index(pipeline_id), "-inf", cutoff - HOUR_S,
            start=0, num=budget, withscores=True))
        removed = 0
        for hour, start in hours:
            bucket = keys.batch_finished_hour(pipeline_id, hour)
            # `created_at` is fixed-width UTC ISO (`core.models.now_iso`): text order is time's.
            # A day past the hour's end: the clocks that wrote `created_at` (API) and the
            # stop's hour (consumer) may differ, and a reused id is at least a claim's
            # lifetime (`creation.RECORD_TTL_S`, 30 days) younger than its earlier batch.
            ended = time.strftime("%Y-%m-%dT%H:%M:%S.000Z",
                                  time.gmtime(start + HOUR_S + DAY_S))
            ids = cast(list[str], await self.redis.lrange(bucket, 0, budget - 1))
            unique = list(dict.fromkeys(ids))  # a batch bucketed twice (a backfill's race)
            async with self.redis.pipeline(transaction=False) as pipe:
                for batch_id in unique:
                    # Plain fields, even in a packed hash (`core.packing.PLAIN`).
                    pipe.hmget(keys.batch(pipeline_id, batch_id), "state", "deleted",
                               "created_at")
                found = cast(list[list[str | None]], await pipe.execute())
            kept: list[str] = []
            for batch_id, (state, deleted, created_at) in zip(unique, found, strict=True):
                # A batch created after the bucket's hour is a later batch of a reused id
                # (a published one, its claim expired): its own stop put it in its own
                # bucket, which removes it in its turn.
                if state == "stop" and deleted is None and (created_at or "") < ended:
                    resumes = await self._resumes_holding(pipeline_id, batch_id)
                    if resumes is None:
                        # Its snapshot again: a round cut short after its tombstone (this
                        # process killed, say) left that tombstone last on the topic, and a
                        # rebuild would lose a batch kept for its resume.
                        await self.snapshots.write_current([(pipeline_id, batch_id)])
                        kept.append(batch_id)
                        continue
                    await self.snapshots.tombstone(pipeline_id, batch_id)
                    # A publisher's run sent again must not bring it back as new.
                    await mark_deleted(self.redis, pipeline_id, batch_id)
                    if await self._purge(pipeline_id, batch_id, ended, resumes):
                        # Again after the purge: a snapshot read between the first and the
                        # purge (a late event's flush, an export) may have landed after the
                        # first, its writer's look finding the hash still there. Compaction
                        # keeps a key's last record, which must be a tombstone.
                        await self.snapshots.tombstone(pipeline_id, batch_id)
                        removed += 1
                    elif await self._visible_again(pipeline_id, batch_id):
                        kept.append(batch_id)
            if kept:
                # Looked at again a retention from now (before the trim: a sweeper dying
                # between the two leaves them in both buckets, which is harmless).
                now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(self._clock()))
                await self._bucket(keys=[keys.batch_finished_index(pipeline_id)],
                                   args=[now, *kept])
            await self.store.scripts.trim_bucket(
                keys=[bucket, keys.batch_finished_index(pipeline_id)],
                args=[hour, len(ids), ids[-1] if ids else ""])
            budget -= len(ids)
            if budget <= 0:
                self._more = True
                break
        return removed

    async def _resumes_holding(self, pipeline_id: str, batch_id: str) -> list[str] | None:
        """None when a kept batch still goes on from this one's data: a resume of it (noted
        in its resumed-by set) that is visible and ran no step yet, so never took the files
        over (its own resume would go on from this batch's data, and be refused as having
        nothing to resume from once this batch's record is gone), or one noted whose create
        may still be under way; the batch is then kept, and looked at again a retention
        later. Else the resumes the set holds (the purge checks it holds them alone still)."""
        members = cast(set[str], await self.redis.smembers(keys.resumed_by(pipeline_id,
                                                                           batch_id)))
        for member in sorted(members):
            fields = await self.store.fields(pipeline_id, member)
            if fields is None:
                made_ms = batch_id_ms(member)
                if made_ms is not None and time.time() - made_ms / 1000 < RESUME_CREATE_WINDOW_S:
                    return None
            elif is_visible(fields) and not any(f.startswith(STARTED_PREFIX) for f in fields):
                return None
        return sorted(members)

    async def _purge(self, pipeline_id: str, batch_id: str, ended: str,
                     resumes: list[str]) -> bool:
        """`BatchStore.purge`, only if the batch is still as checked (`SWEEP_BATCH`): a DELETE
        that hid it since owns it, and its clean-up must find the hash to remove the batch's
        data (its steps are named there) before it purges it; a resume noted since goes on
        from it."""
        fields = await self.store.fields(pipeline_id, batch_id)
        if not await self._sweep_batch(
                keys=[keys.batch(pipeline_id, batch_id), keys.batch_seen(pipeline_id, batch_id),
                      keys.batch_index(pipeline_id), *keys.batch_filter_indexes(pipeline_id),
                      keys.batch_finished_index(pipeline_id),
                      keys.batch_purged(pipeline_id, batch_id),
                      keys.resumed_by(pipeline_id, batch_id)],
                args=[batch_id, keys.CHANGES_CHANNEL, ended, len(resumes), *resumes]):
            return False
        # As BatchStore.purge: its own note in the batch it went on from.
        holder = fields.get(RESUMED_FROM) if fields else None
        if holder:
            await self.redis.srem(keys.resumed_by(pipeline_id, holder), batch_id)
        return True

    async def _visible_again(self, pipeline_id: str, batch_id: str) -> bool:
        """After a purge refused: a visible batch of the id (a resume of it noted since, or a
        later batch of a reused id) has its snapshot written again, since its tombstone went
        first; True when it is stopped, so kept in the current hour's bucket."""
        state, deleted = await self.redis.hmget(keys.batch(pipeline_id, batch_id), "state",
                                                "deleted")
        if state is None or deleted is not None:
            return False  # gone, or hidden: its delete's clean-up purges and tombstones it
        await self.snapshots.write_current([(pipeline_id, batch_id)])
        return bool(state == "stop")

    async def backfill(self, pipeline_id: str) -> None:
        """Buckets the pipeline's stopped batches that predate the finished buckets, once."""
        await ensure_finished(self.redis, self.store.scripts, pipeline_id)
