"""The events consumer: batches of events from Kafka applied to Redis in one round trip.

Each `getmany` result is decoded and applied with a single `BatchStore.apply` call (a few
scripts, pipelined: one per pipeline and up to 100 of its batches), then committed. The
script enforces the state order, final step states, offsets by value (max) and
de-duplication of state events, so a batch delivered again after a crash changes nothing.
Every batch a poll reached is then snapshotted on the compacted snapshots topic
(`core.snapshots`; written by `consumers/plumbing/snapshot_batch.py`) before the poll is
committed: whatever a committed offset covers is in a snapshot, which is what lets a
rebuild of Redis start the events where this group left off. A rebalance hands the work in
flight over first (`consumers/plumbing/stages.py`), so a consumer that lost a partition
never snapshots it after its new owner.

Errors follow `core.retry`: Redis or Kafka unavailable (down, READONLY after a failover,
OOM, LOADING, BUSY, ...) is waited out with backoff, and the poll is neither dead-lettered
nor committed meanwhile. Only what no retry can fix goes to the dead letters: malformed
records, and the events of a batch whose data makes the script fail (found by applying
batch by batch after a permanent script error: `consumers/plumbing/polls.py`). Events of
deleted or unknown batches are dropped by the script.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from consumers.plumbing.dlq import DeadLetters
from consumers.plumbing.kafka import Record, commit_retrying, open_consumer
from consumers.plumbing.options import ConsumerOptions
from consumers.plumbing.part import Clients, Part
from consumers.plumbing.polls import UNAPPLICABLE, Poll, apply_by_batch, bad_script_data, decode
from consumers.plumbing.rekey import send_keyed
from consumers.plumbing.snapshot_batch import Fenced, SnapshotBatches
from consumers.plumbing.stages import Covered, Stages
from core.codec import Event
from core.retry import Backoff, Stopping
from core.settings import Settings
from core.store import BatchStore

log = logging.getLogger(__name__)
STATS_EVERY_S = 10.0
# A flush starts early once this many batches wait for their snapshot, and applies wait for a
# lagging flush past it: it bounds one flush's Redis work, the memory of what waits and what
# a crash re-reads.
FLUSH_BATCHES = 10_000


class EventsConsumer(Part):
    name = "events"

    def __init__(self, settings: Settings, options: ConsumerOptions | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.options = options or ConsumerOptions()
        self.backoff = Backoff(self.stopping, self.options.retry_policy())
        self._consumer: AIOKafkaConsumer | None = None
        # The apply and the flush in flight, what is due, and a revoke's hand-over of them.
        self.stages = Stages(self.name, self._flush, self.options.revoke_wait_s)
        # Totals since start, logged every STATS_EVERY_S and read by tests and benchmarks.
        self.applied = 0
        self.scanned = 0  # read by the scanner (core.offsets_scan), not decoded one by one
        self.changed = 0
        self.dropped = 0
        self.dead = 0
        self.rekeyed = 0

    async def _open(self, clients: Clients, scope: contextlib.AsyncExitStack) -> None:
        s = self.settings
        self.store = BatchStore.from_settings(clients.redis, s)
        self.snapshots = SnapshotBatches(clients.producer, clients.redis, s.topic_snapshots,
                                         admit=self.stages.admit)
        self.stages.quiet = self.snapshots.quiet
        self.dlq = DeadLetters(clients.producer, s.topic_dlq, self.name)
        self.producer = clients.producer
        self._consumer = await open_consumer(
            s, self.name, s.topic_events, s.group_events, listener=self.stages,
            revoke_wait_s=self.options.revoke_wait_s,
            max_poll_records=self.options.events_max_records,
            # Big fetches: throughput here is bounded by per-request overhead, not bytes.
            max_partition_fetch_bytes=8 << 20, fetch_max_bytes=64 << 20,
        )
        scope.push_async_callback(self._consumer.stop)

    async def _loop(self) -> None:
        assert self._consumer is not None
        last_stats, last_applied = time.monotonic(), 0
        # Two stages run beside the fetch: the newest poll is fetched and decoded (Python's
        # work) while the one before is applied (Redis's work), and, off the path to
        # visible, a flush snapshots every batch the applied polls reached and then commits
        # them (`_flush`). Flushes are coalesced: one at a time, started once the previous
        # ended and `events_flush_interval_s` passed (or the stream paused), covering every
        # poll applied since; a batch touched by many polls is snapshotted once a flush, not
        # once a poll. Polls apply in order and are committed only after their effect and
        # their snapshots; a failure leaves later polls unapplied, or applied and
        # uncommitted (read again later: every effect is idempotent), never committed past.
        stages = self.stages  # shared with the rebalance listener: see consumers.plumbing.stages
        flushed_at = time.monotonic()
        interval = self.options.events_flush_interval_s
        try:
            while not self.stopping.is_set():
                batch = await self._consumer.getmany(
                    timeout_ms=self.options.poll_timeout_ms,
                    max_records=self.options.events_max_records)
                if batch:
                    prepared = await self._prepare(batch)
                    await stages.take_applied()
                    if stages.flushing is not None and len(stages.due.reached) >= FLUSH_BATCHES:
                        # Back-pressure: a flush that lags (Kafka slow to acknowledge) holds
                        # the applies once this much waits, bounding what a crash re-reads.
                        await stages.flushed()
                    stages.applying = asyncio.create_task(self._effect(prepared))
                    # Let the apply run up to its wait for Redis (its scripts sent) before
                    # this loop fetches and decodes the next poll: Redis works meanwhile.
                    await asyncio.sleep(0)
                elif stages.applying is not None and stages.applying.done():
                    await stages.take_applied()  # raises what a failed apply raised
                if stages.flushing is not None and stages.flushing.done():
                    await stages.flushed()  # raises what a failed snapshot or commit raised
                if stages.flushing is None and stages.due and (
                        not batch or len(stages.due.reached) >= FLUSH_BATCHES
                        or time.monotonic() - flushed_at >= interval):
                    stages.start_flush()
                    flushed_at = time.monotonic()
                if time.monotonic() - last_stats > STATS_EVERY_S and self.applied != last_applied:
                    last_stats, last_applied = time.monotonic(), self.applied
                    log.info("events: %d applied (%d read by the scanner, %d changed a "
                             "batch), %d dropped, %d dead-lettered, %d re-keyed", self.applied,
                             self.scanned, self.changed, self.dropped, self.dead, self.rekeyed)
            await stages.settle()  # a graceful stop commits what was applied
        except Stopping:
            return  # Redis or Kafka down at shutdown: left uncommitted, read again later
        finally:
            tasks = [t for t in (stages.applying, stages.flushing) if t is not None]
            if not all(t.done() for t in tasks):
                # Leaving on an error elsewhere: the work in flight ends on its own terms
                # (stopping makes its retries give up), never cut in half.
                self.stopping.set()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def process(self, batch: dict[TopicPartition, list[Record]]) -> None:
        """Applies one `getmany` result and commits it. Raises `Stopping` (shutdown while a
        dependency is down) or `GaveUp`; either way nothing past the last commit is lost."""
        await self._flush(await self._effect(await self._prepare(batch)))

    async def _prepare(self, batch: dict[TopicPartition, list[Record]]) -> Poll:
        """Decodes a poll (`consumers.plumbing.polls.decode`) under the current assignment."""
        return await decode(batch, self.stages.epoch, self.options.events_scan)

    async def _effect(self, poll: Poll) -> Covered:
        """Applies a poll's events and dead-letters its malformed records. Returns what a
        flush owes the poll: the batches it reached (to snapshot) and its offsets (to
        commit). Of a poll fenced by a revoke (`_fenced`), what is not done yet is left
        undone."""
        if self._fenced(poll):
            return Covered(poll.epoch)
        events, bad = poll.applied, poll.bad
        reached: list[tuple[str, str]] = []
        if events:
            unapplied = 0
            try:
                results = await self._apply(events)
            except Exception as exc:
                if not bad_script_data(exc):
                    # Stopping; or GaveUp: an error that is neither Redis unavailable nor a
                    # batch's data (say an OSError) outlasted its retries. The part ends and
                    # the process restarts (runner) with the poll uncommitted: re-read, not
                    # lost, and not dead-lettered for a cause outside the events.
                    raise
                # Some batch's data breaks the script: apply batch by batch and dead-letter
                # only the batches that fail.
                log.error("apply failed (%s); retrying batch by batch", exc)
                before = len(bad)
                results = await apply_by_batch(poll.batch, bad, self._apply)
                unapplied = len(bad) - before  # dead-lettered: counted there, not applied
            self.applied += poll.count - unapplied
            self.scanned += poll.taken
            for n in results.values():
                if n < 0:
                    self.dropped += 1
                else:
                    self.changed += n
            # Every batch the poll reached, not only those it changed: after a crash between
            # the apply and the snapshot the poll is applied again and changes nothing, yet
            # its snapshot is still owed.
            reached = [batch for batch, n in results.items() if n >= 0]
        if bad and not self._fenced(poll):
            await self.backoff.call("dead-letter", lambda: self._dead_letter(bad))
        if poll.rekey and not self._fenced(poll):
            await self.backoff.call("re-key", lambda: send_keyed(
                self.producer, self.settings.topic_events, poll.rekey))
            self.rekeyed += len(poll.rekey)
        return Covered(poll.epoch, dict.fromkeys(reached),
                       {tp: recs[-1].offset + 1 for tp, recs in poll.batch.items()})

    def _fenced(self, poll: Poll) -> bool:
        """Whether the poll's assignment was revoked since it was fetched (a revoke can come
        while it is decoded or applied). Such a poll is never committed here: its partitions'
        owners read it again from the last commit and do all of it, its dead letters and
        re-keyed records too, which sent from here as well would come twice."""
        return poll.epoch != self.stages.epoch

    async def _flush(self, due: Covered) -> None:
        """Snapshots the batches the covered polls reached, as Redis holds them now, then
        commits the polls. A snapshot may hold the effect of a later poll too, which is
        harmless (a rebuild applies those events again from the committed offset, and every
        rule of APPLY_EVENTS only moves forward). Polls of an assignment revoked meanwhile
        are neither snapshotted nor committed (see consumers.plumbing.stages)."""
        assert self._consumer is not None
        if not self.stages.current(due):
            return
        self.stages.flushing_epoch = due.epoch
        if due.reached:
            reached = list(due.reached)
            try:
                await self.backoff.call("snapshot",
                                        lambda: self.snapshots.write_current(reached))
            except Fenced:
                log.info("events: flush of %d batches dropped: revoked meanwhile", len(reached))
                return
        if self.stages.current(due):
            await commit_retrying(self._consumer, due.offsets, self.backoff)

    async def _apply(self, events: list[Event]) -> dict[tuple[str, str], int]:
        return await self.backoff.call("apply events", lambda: self.store.apply(events))

    async def _dead_letter(self, bad: list[tuple[Record, str]]) -> None:
        """All or nothing for `Backoff`: a Kafka error on any record fails the attempt (the
        retry sends them all again: the dead letters are at-least-once, like the rest), and
        every send already queued is awaited first so none is left behind unobserved."""
        futures: list[asyncio.Future[Any]] = []
        try:
            for record, reason in bad:
                kind = "unapplicable" if reason.startswith(UNAPPLICABLE) else "malformed"
                futures.append(await self.dlq.send(record, reason, kind))
        finally:
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        self.dead += len(bad)
