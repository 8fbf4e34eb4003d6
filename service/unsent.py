"""Run commands a POST or a resume created a batch for but may never have sent.

The create script enters each new batch in its pipeline's unsent runs (`keys.unsent_runs`,
at Redis's time). Once Kafka acks the run command the entry goes (gathered in memory, one
ZREM per pipeline a round). An API process that died between the create and the ack leaves
its entry behind: after the lease, any API process's sweep claims it (`SWEEP_UNSENT`, so one
process sends each) and, if the batch is still `pending` and visible, sends its run command
again from its recorded fields. A run command twice runs one flow run; one after a delete or
a stop is skipped by the commands consumer. Run by the `Abandoner`'s loop.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import cast

from redis.asyncio import Redis

from core import keys, layout
from core.api_scripts import ApiScripts
from core.codec import CodecError, Command
from core.layout import is_visible
from core.retry import describe
from service import creates
from service.command_sender import CommandSender

log = logging.getLogger(__name__)

# As the Idempotency-Key's: longer than any live attempt (its create, a send's timeout, the
# undo), so a sweep never races a POST still under way.
UNSENT_LEASE_S = 60.0
SWEEP_LIMIT = 100  # unsent runs a pipeline's sweep claims at most per round
REMOVE_CHUNK = 1000  # acked entries per ZREM

# (pipeline, batch, version, reason): ends a batch no run command can be made of.
Abandon = Callable[[str, str, str, str], Awaitable[None]]
# (pipeline, batch, version): enters its delete command in the Abandoner's outbox.
QueueDelete = Callable[[str, str, str], Awaitable[None]]


class UnsentRuns:
    def __init__(self, redis: Redis, scripts: ApiScripts, sender: CommandSender, *,
                 abandon: Abandon, queue_delete: QueueDelete, wake: Callable[[], None],
                 lease_s: float = UNSENT_LEASE_S) -> None:
        self._redis = redis
        self._scripts = scripts
        self._sender = sender
        self._abandon = abandon
        self._queue_delete = queue_delete
        self._wake = wake  # the loop's: removes acked entries early when many wait
        self.lease_s = lease_s
        # Run commands Kafka took, their unsent-runs entries still to remove: pipeline -> ids.
        self._acked: dict[str, set[str]] = {}
        self._acked_count = 0

    def sent(self, pipeline_id: str, batch_id: str) -> None:
        """Kafka took the batch's run command: its unsent-runs entry goes at the next round
        (a process that dies first leaves it to a sweep, which finds the batch taken or sends
        a harmless second run command)."""
        ids = self._acked.get(pipeline_id)
        if ids is None:
            ids = self._acked[pipeline_id] = set()
        ids.add(batch_id)
        self._acked_count += 1
        if self._acked_count >= REMOVE_CHUNK:
            self._wake()

    async def remove_acked(self) -> None:
        acked, self._acked, self._acked_count = self._acked, {}, 0
        try:
            while acked:
                pipeline_id, ids = next(iter(acked.items()))
                members = sorted(ids)
                for at in range(0, len(members), REMOVE_CHUNK):
                    chunk = members[at:at + REMOVE_CHUNK]
                    await self._redis.zrem(keys.unsent_runs(pipeline_id), *chunk)
                    ids.difference_update(chunk)
                del acked[pipeline_id]
        finally:
            for pipeline_id, ids in acked.items():  # Redis away: kept for the next round
                for batch_id in ids:
                    self.sent(pipeline_id, batch_id)

    async def sweep_once(self) -> int:
        """Sends again the run commands of the batches still `pending` whose unsent-runs
        entry outlived the lease. Returns how many were sent. Raises while Redis or Kafka is
        away: what is left stays in the sets for a later round."""
        await self.remove_acked()
        done = 0
        for pipeline_id in sorted(cast(set[str], await self._redis.smembers(keys.PIPELINES))):
            claimed = cast(list[str], await self._scripts.sweep_unsent(
                keys=[keys.unsent_runs(pipeline_id)],
                args=[keys.batch(pipeline_id, ""), int(self.lease_s * 1000), SWEEP_LIMIT]))
            for batch_id in claimed:
                done += await self._resend(pipeline_id, batch_id)
        return done

    async def _resend(self, pipeline_id: str, batch_id: str) -> int:
        unsent = keys.unsent_runs(pipeline_id)
        fields = cast(dict[str, str], await self._redis.hgetall(keys.batch(pipeline_id,
                                                                           batch_id)))
        if not is_visible(fields) or fields.get("state") != "pending":
            await self._redis.zrem(unsent, batch_id)  # taken, hidden or purged since the claim
            return 0
        version = fields.get("pipeline_version", "")
        try:
            command = Command("run", batch_id, pipeline_id, pipeline_version=version,
                              event_id="run-" + batch_id, recorded=creates.recorded(fields))
        except (CodecError, KeyError, ValueError) as exc:
            # No run command can be made of it: ended, so it does not read `pending` for ever.
            await self._abandon(pipeline_id, batch_id, version,
                                f"its API process stopped before queueing its run, and the "
                                f"run could not be queued again ({describe(exc)})")
            await self._redis.zrem(unsent, batch_id)
            return 0
        try:
            await self._sender.command(command)
        except Exception:
            # Kafka did not take it: due again at the next sweep (its claim given back).
            with contextlib.suppress(Exception):
                await self._redis.zadd(unsent, {batch_id: 0}, xx=True)
            raise
        log.warning("batch %s/%s: its run command was never seen queued (its API process "
                    "stopped after its create); queued now", pipeline_id, batch_id)
        state, deleted = cast(list[str | None], await self._redis.hmget(
            keys.batch(pipeline_id, batch_id), "state", layout.DELETED))
        if state is None or deleted is not None:
            # Deleted while this was sent: its delete may be on the topic before this run.
            # The consumer skips the run either way, but a rebuild of Redis takes the last
            # creation after the last delete for a live batch: a delete goes behind it.
            await self._queue_delete(pipeline_id, batch_id, version)
        await self._redis.zrem(unsent, batch_id)
        return 1
