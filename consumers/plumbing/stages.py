"""The events consumer's stages beside its fetch (the apply in flight, the flush in flight,
what the applied polls owe a flush) and what a rebalance does to them.

With the apply and the flush pipelined, a flush can be in flight across a revoke: its
snapshots, read from Redis before the revoke, landed after those of the partition's new
owner, and compaction kept the older one although the group had committed past the event
that made the newer (a rebuild then lost it). So the revoke settles the stages first.
aiokafka calls `on_partitions_revoked` from its group coordination, with this member still
in its generation (its commits go through, its heartbeat goes on), and rejoins only once
the listener returns; `getmany` meanwhile waits for the new assignment, so the loop fetches
nothing new. The listener waits for the apply in flight and the flush in flight, flushes
what is due and commits it: the new owner starts from a commit whose snapshots the broker
acknowledged.

That wait is bounded (revoke_wait_s: Redis or Kafka may be down, and the group cannot
rebalance meanwhile). Past it the old assignment's work is fenced by an epoch: what it
applied is neither snapshotted nor committed (`SnapshotBatches.admit`, `current`), and the
partitions' owners read it again from the last commit (every effect is idempotent). A write
already handed to the producer cannot be recalled: the listener waits for its
acknowledgement whatever the bound (the producer's own timeouts end it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRebalanceListener, TopicPartition

from consumers.plumbing.kafka import names

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Covered:
    """What a flush owes applied polls of one assignment (`epoch`): the batches they reached
    (in order, once each) and the offset after each partition's last record."""

    epoch: int
    reached: dict[tuple[str, str], None] = field(default_factory=dict)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)

    def add(self, later: Covered) -> None:
        self.reached.update(later.reached)
        self.offsets.update(later.offsets)  # a later poll's offsets are further

    def __bool__(self) -> bool:
        return bool(self.offsets)


class Stages(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, part: str, flush: Callable[[Covered], Coroutine[Any, Any, None]],
                 revoke_wait_s: float) -> None:
        self._part = part
        self._flush = flush
        self._revoke_wait_s = revoke_wait_s
        self.epoch = 0  # one per assignment: a revoke ends it
        self.applying: asyncio.Task[Covered] | None = None
        self.flushing: asyncio.Task[None] | None = None
        self.due = Covered(0)
        self.flushing_epoch = 0  # of the flush at work (one at a time)
        # Waits for the snapshot writes past their `admit` check (`SnapshotBatches.quiet`).
        self.quiet: Callable[[], Awaitable[None]] | None = None

    def current(self, covered: Covered) -> bool:
        return covered.epoch == self.epoch

    def admit(self) -> bool:
        """Whether the flush at work may still send what it read."""
        return self.flushing_epoch == self.epoch

    async def take_applied(self) -> None:
        """The apply in flight, awaited and added to what is due (raises what it raised; the
        task then stays, for the loop to meet the same error). Shielded: a revoke that stops
        waiting does not cut the apply in half."""
        task = self.applying
        if task is None:
            return
        covered = await asyncio.shield(task)
        if self.applying is task:  # not taken meanwhile by the loop or the listener
            self.applying = None
            if self.current(covered):
                self.due.add(covered)  # else: re-read by the partitions' owners

    async def flushed(self) -> None:
        """The flush in flight, awaited (raises what it raised)."""
        task = self.flushing
        if task is None:
            return
        await asyncio.shield(task)
        if self.flushing is task:
            self.flushing = None

    def start_flush(self) -> None:
        """A flush of what is due (the caller checked that none is in flight)."""
        due, self.due = self.due, Covered(self.epoch)
        self.flushing = asyncio.create_task(self._flush(due), name=f"{self._part} flush")

    async def settle(self) -> None:
        """Applies and flushes everything in hand, to the commit."""
        while True:
            if self.applying is not None:
                await self.take_applied()
            elif self.flushing is not None:
                await self.flushed()
            elif self.due:
                self.start_flush()
            else:
                return

    # -- rebalances ----------------------------------------------------------------------

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        if not revoked:
            return  # the first join
        log.info("%s: partitions revoked %s", self._part, names(revoked))
        settling = asyncio.create_task(self.settle(), name=f"{self._part} revoke")
        await asyncio.wait({settling}, timeout=self._revoke_wait_s)
        if not settling.done():
            settling.cancel()  # the apply and flush go on (shielded), fenced below
            log.warning("%s: work in hand not flushed within %.0fs of a revoke: left "
                        "uncommitted, read again from the last commit", self._part,
                        self._revoke_wait_s)
        elif not settling.cancelled() and (error := settling.exception()) is not None:
            # The loop meets the same error in the task that raised it.
            log.warning("%s: flush at revoke failed: %r", self._part, error)
        self.epoch += 1
        self.due = Covered(self.epoch)
        if self.quiet is not None:
            await self.quiet()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("%s: partitions assigned %s", self._part, names(assigned))
