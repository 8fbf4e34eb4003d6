"""What a rebuild of Redis takes from the commands topic (`consumers.rebuild` reads it whole):
the deletes and stops whose work may be unfinished, the API's runs with what they recorded,
and the batches published with a creation request, each in its place on the topic.

A batch's commands share its key, so its partition, and their offsets order them: a delete
or a stop applies to the batch only when it follows the batch's last published creation there
(a delete of an id nobody created yet does nothing, README, and must not hide the batch that
id names later). An API's run command is no creation: the API recorded its batch before
sending it, under an id of its own making, so a delete of that id can only be of that batch,
even one that reached the topic first (a DELETE while the POST's send was slow; live, the
consumer hides the batch, then skips its run). A creation that left the topic (retention by
time, oldest first) came before every command of that key still on it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from aiokafka import ConsumerRecord
from redis.asyncio import Redis

from consumers.plumbing.cleanup import member
from consumers.plumbing.creation import RECORD_TTL_S, Claim
from core import keys
from core.codec import CodecError, decode_command
from core.command_messages import Delete, Run
from core.restore_runs import idempotency_records, recorded_of

Batch = tuple[str, str]  # (pipeline id, batch id)


class At(NamedTuple):
    """Where a command is on the topic, and the time its sender gave it."""

    partition: int
    offset: int
    ts: float

    def after(self, other: At | None) -> bool:
        if other is None:
            return True
        if self.partition == other.partition:
            return self.offset > other.offset
        return self.ts > other.ts  # the topic was repartitioned since: the senders' clocks


@dataclass(slots=True)
class CommandsRead:
    """Each batch's last delete, stop, published creation (a run with `create`), and run
    with `create` or `recorded`."""

    delete_at: dict[Batch, At] = field(default_factory=dict)
    stop_at: dict[Batch, At] = field(default_factory=dict)
    created_at: dict[Batch, At] = field(default_factory=dict)
    run_at: dict[Batch, At] = field(default_factory=dict)
    # The API's runs, each carrying what its create recorded (`core.restore_runs`).
    recorded: dict[Batch, Run] = field(default_factory=dict)
    # The runs published with `create` (their batch ids are claimed: `keys.published`).
    published: set[Batch] = field(default_factory=set)
    # Batches an API process gave up on after their run command's send went unanswered
    # (`service.abandon`): their Idempotency-Key was released, so it is not restored.
    abandoned: set[Batch] = field(default_factory=set)

    def take(self, record: ConsumerRecord[bytes, bytes]) -> None:
        value = record.value
        if value is None or not (b"delete" in value or b'"stop"' in value
                                 or b'"recorded"' in value or b'"create"' in value):
            return  # cheap: a plain run or a deploy is not worth decoding
        try:
            command = decode_command(value)
        except CodecError:
            return
        batch = (command.pipeline_id, command.batch_id)
        at = At(record.partition, record.offset, command.ts)
        if isinstance(command, Delete):
            self.delete_at[batch] = at
            if command.abandoned is True:
                self.abandoned.add(batch)
        elif command.type == "stop":
            self.stop_at[batch] = at
        elif isinstance(command, Run):
            if recorded_of(command) is not None:
                self.recorded[batch] = command
            if command.creation is not None:
                self.published.add(batch)
                self.created_at[batch] = at
            if recorded_of(command) is not None or command.creation is not None:
                self.run_at[batch] = at

    @property
    def deletes(self) -> set[Batch]:
        """The batches deleted since their last published creation (an API's batch: at all)."""
        return {batch for batch, at in self.delete_at.items()
                if at.after(self.created_at.get(batch))}

    def _removed_since(self, batch: Batch, committed: Mapping[int, int], retention_s: float,
                       now: float) -> bool:
        """Whether the batch's creation was taken by the commands group (`committed`: its next
        offset per partition) longer than the retention ago: its creation was snapshotted
        then, so with no record of it left on the snapshots topic, the retention removed it
        and compaction dropped its tombstone since (a day on, while the commands topic keeps
        a week)."""
        at = self.run_at[batch]
        return (retention_s > 0 and at.offset < committed.get(at.partition, 0)
                and at.ts < now - retention_s)

    def removed_published(self, committed: Mapping[int, int], retention_s: float,
                          now: float, held: set[Batch]) -> set[Batch]:
        """The published batches (not in `held`: no record on the snapshots topic) removed by
        the retention since (`_removed_since`): their ids' claims are restored as deleted."""
        return {batch for batch in self.published - held
                if self._removed_since(batch, committed, retention_s, now)}

    def to_restore(self, committed: Mapping[int, int], retention_s: float,
                   now: float) -> dict[Batch, Run]:
        """The API's runs whose batch a snapshot may not hold because its run command was
        not taken yet (`core.restore_runs`): not one removed by the retention since
        (`_removed_since`, `retention_s` 0: forever), its run command still on the topic. A
        deleted one is (hidden: its delete's clean-up is queued again)."""
        deletes = self.deletes
        return {batch: run for batch, run in self.recorded.items()
                if batch in deletes or not self._removed_since(batch, committed, retention_s, now)}

    @property
    def stops(self) -> set[Batch]:
        """The batches stopped since their last published creation (an API's batch: at all)."""
        return {batch for batch, at in self.stop_at.items()
                if at.after(self.created_at.get(batch))}


async def requeue(redis: Redis, kind: str, jobs: Iterable[tuple[Batch, float]]) -> None:
    """The clean-up's queue was in Redis too: each job again, due now, begun at its
    command's time (a stop's wait for a Pending run counts from the stop). Every pass is
    idempotent, so a job whose work was done before Redis was lost is simply done again.
    The records are the ones `Cleanup.enqueue` writes, in one round trip (a rebuild may hide
    thousands)."""
    now = time.time()
    async with redis.pipeline(transaction=False) as pipe:
        for (pipeline_id, batch_id), since in jobs:
            job = member(kind, pipeline_id, batch_id)
            pipe.hsetnx(keys.CLEANUP_SINCE, job, repr(min(since, now)))
            pipe.zadd(keys.CLEANUP_DUE, {job: now}, nx=True)
        await pipe.execute()


async def restore_claims(redis: Redis, commands: CommandsRead, purged: set[Batch],
                         idempotency_ttl_s: int, removed: set[Batch] | None = None) -> None:
    """The records that keep a request from making a second batch: each Idempotency-Key
    committed by the API's runs still on the topic, for what is left of its TTL (not one an
    abandoned batch's API released), and each published batch id deleted or purged
    (tombstoned: by its delete's clean-up or by the retention; or `removed` by the retention,
    its tombstone compacted away since) since, claimed as deleted (its
    version and config are not known again: a command published again is compared by
    pipeline only, then left deleted). The claims of published batches that still exist are
    taken again from the batches themselves when their ids are published again
    (`Creations.ensure`)."""
    now = time.time()
    runs = [run for batch, run in commands.recorded.items() if batch not in commands.abandoned]
    async with redis.pipeline(transaction=False) as pipe:
        for key, value, ttl_s in idempotency_records(runs, now, idempotency_ttl_s):
            pipe.set(key, value, ex=ttl_s, nx=True)
        gone = commands.deletes | purged | (removed or set())
        for pipeline_id, batch_id in commands.published & gone:
            pipe.set(keys.published(batch_id), Claim(pipeline_id, "", {}, True).encode(),
                     ex=RECORD_TTL_S, nx=True)
        await pipe.execute()
