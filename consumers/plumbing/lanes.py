"""One task per partition with records in hand, so the poll loop never waits for a command.

Records of one partition are handled in order by its lane; the partition is paused while
its lane works, so `getmany` goes on being called every poll (the group membership stays
alive whatever a command costs: max_poll_interval is never exceeded) and other partitions
keep flowing. Each record is committed right after its effect.

On a rebalance a revoked partition's lane stops retrying at once, and the revoke waits for
the attempt in flight to end (bounded): the new owner then starts from the last commit
and never runs a command at the same time as the old one. A lane that stops early rewinds
its partition to the first record it did not commit, so nothing is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from consumers.plumbing.kafka import Record, commit_retrying, names
from core.retry import Backoff, RetryPolicy, Stopping

log = logging.getLogger(__name__)
Handler = Callable[[Record, Backoff], Awaitable[None]]


@dataclass(eq=False)
class Lane:
    tp: TopicPartition
    halt: asyncio.Event = field(default_factory=asyncio.Event)
    revoked: bool = False
    task: asyncio.Task[None] | None = None
    backoff: Backoff | None = None


class Lanes(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, part: str, handle: Handler, policy: RetryPolicy,
                 revoke_wait_s: float) -> None:
        self._part = part
        self._handle = handle
        self._policy = policy
        self._revoke_wait_s = revoke_wait_s
        self._lanes: dict[TopicPartition, Lane] = {}
        self._retries_done = 0
        # partition -> (the offset its lane last failed at unexpectedly, how often in a row)
        self._failures: dict[TopicPartition, tuple[int, int]] = {}
        self.consumer: AIOKafkaConsumer | None = None
        self.handled = 0  # records handled to their effect, since start

    @property
    def retries(self) -> int:
        return self._retries_done + sum(
            lane.backoff.retries for lane in self._lanes.values() if lane.backoff is not None)

    def busy(self) -> int:
        return len(self._lanes)

    def start(self, tp: TopicPartition, records: list[Record]) -> None:
        """Hands a partition's records to a new lane and pauses the partition meanwhile."""
        assert self.consumer is not None
        if tp in self._lanes:  # paused, so not expected; read them again later
            self.consumer.seek(tp, records[0].offset)
            return
        self.consumer.pause(tp)
        lane = Lane(tp)
        lane.backoff = Backoff(lane.halt, self._policy)
        self._lanes[tp] = lane
        lane.task = asyncio.create_task(self._run(lane, records),
                                        name=f"{self._part} {tp.topic}:{tp.partition}")

    async def _run(self, lane: Lane, records: list[Record]) -> None:
        assert self.consumer is not None and lane.backoff is not None
        next_offset = records[0].offset
        try:
            for record in records:
                if lane.halt.is_set():
                    break
                await self._handle(record, lane.backoff)
                self.handled += 1
                if not await commit_retrying(self.consumer, {lane.tp: record.offset + 1},
                                             lane.backoff):
                    lane.revoked = True  # reassigned meanwhile: the rest is the new owner's
                    break
                next_offset = record.offset + 1
                self._failures.pop(lane.tp, None)
        except Stopping:
            pass
        except Exception:
            # Not expected (handle dead-letters what it cannot do): read it again, after a
            # pause that grows while the same record keeps failing, so a bug costs a log line
            # now and then rather than a hot loop of them. The partition stays paused.
            at, count = self._failures.get(lane.tp, (next_offset, 0))
            count = count + 1 if at == next_offset else 1
            self._failures[lane.tp] = (next_offset, count)
            pause = min(self._policy.cap_s, self._policy.initial_s * 2 ** (count - 1))
            log.exception("%s: lane %s:%d failed at offset %d (%d in a row); read again in "
                          "%.1fs", self._part, lane.tp.topic, lane.tp.partition, next_offset,
                          count, pause)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await lane.halt.wait()  # a shutdown or a revoke does not wait it out
        finally:
            self._retries_done += lane.backoff.retries
            self._lanes.pop(lane.tp, None)
            self._reopen(lane, next_offset, records[-1].offset + 1)

    def _reopen(self, lane: Lane, next_offset: int, end: int) -> None:
        consumer = self.consumer
        if consumer is None or lane.revoked or lane.tp not in consumer.assignment():
            return
        if next_offset < end:
            consumer.seek(lane.tp, next_offset)
        consumer.resume(lane.tp)

    def halt_all(self) -> None:
        """Shutdown: each lane finishes its attempt in flight and handles nothing more."""
        for lane in self._lanes.values():
            lane.halt.set()

    async def drain(self, grace_s: float) -> None:
        tasks = [lane.task for lane in self._lanes.values() if lane.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_s)
            for task in pending:
                task.cancel()

    # -- rebalances ----------------------------------------------------------------------

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        if not revoked:
            return
        log.info("%s: partitions revoked %s", self._part, names(revoked))
        lanes = [self._lanes[tp] for tp in revoked if tp in self._lanes]
        for lane in lanes:
            lane.revoked = True
            lane.halt.set()
        tasks = [lane.task for lane in lanes if lane.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self._revoke_wait_s)
            for task in pending:  # its effect is idempotent; the new owner redoes it
                log.warning("%s: %s still busy at revoke; cancelled", self._part, task.get_name())
                task.cancel()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("%s: partitions assigned %s", self._part, names(assigned))
