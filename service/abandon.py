"""Batches the API gives up on after a command whose fate Kafka did not tell.

A run command that timed out may still be written (the producer keeps retrying it), and a
consumer may even have started its flow run already. Purging the batch would leave that run
orphaned; keeping it would let it run after the client was told 503. Instead the batch is
made unrunnable at once — hidden, `stop`/`failed` with the reason, with a TTL as a backstop —
and a delete command is queued behind the run command as soon as Kafka takes it: the
commands consumer then skips the run (hidden batch) or cancels and deletes its flow run.

The deletes still to queue live in a Redis outbox (`keys.ABANDONED`), so a restart of the
API process does not lose them; any API process drains it (a delete sent twice is harmless).

A create whose answer never came (Redis ran it, or not, and then went away) is the other
batch given up on: no run command was sent for it, so it is purged (`undo`), at once if
Redis answers, else by the same loop once it does; so is an abandon Redis did not take
(its command may be on the topic), and a stop's outbox entry. Those wait in this process
only: Redis is what is missing.

A stop whose send was ambiguous may be written too, so it will happen and is answered as
accepted: it waits in an outbox of its own (`STOPS`) and is sent again once Kafka takes it
(a stop twice is harmless: the second finds the batch stopping or stopped).

A POST with an Idempotency-Key names its attempt (`KeyHolder`) to its undo and abandon. Late,
they could meet a batch that is no longer the attempt's: with Redis away past the key's
lease, a retry on another API process takes the key over and finishes the batch (creates it
or sends its run again), commits and answers 200 with it. So each first asks the key's
record (`HOLD_FOR_UNDO`), which renews the attempt's lease while the record is still its own,
and leaves the batch alone once the record holds it for another attempt or committed it; the
key is released only once the undo or abandon is done.

The same loop removes the unsent-runs entries of run commands Kafka took and sweeps those
left behind by a process that died between a create and its send (`service/unsent.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import msgspec
import orjson
from redis.asyncio import Redis

from core import keys
from core.api_scripts import ApiScripts
from core.codec import Command
from core.layout import is_visible
from core.models import now_iso
from core.retry import RetryPolicy, Verdict, classify, describe
from service.command_sender import CommandSender
from service.unsent import UNSENT_LEASE_S, UnsentRuns

log = logging.getLogger(__name__)
ABANDONED_TTL_S = 24 * 3600
UNDO_TIMEOUT_S = 2.0  # the failed request's answer waits this long for its undo
# Not members of `keys.ABANDONED`: an API process of an earlier release drains that one and
# takes each member for a delete.
STOPS = f"{keys.ABANDONED}:stops"
Purge = Callable[[str, str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class KeyHolder:
    """A POST attempt holding an Idempotency-Key (`service.idempotency`): the record's Redis
    key, and the attempt's own new batch id (which a take-over's record keeps as `a`)."""

    record_key: str
    attempt: str
    lease_ms: int  # renewed while its undo runs (`IdempotencyKeys`'s pending lease)


class Abandoner:
    def __init__(self, redis: Redis, scripts: ApiScripts, sender: CommandSender, *,
                 purge: Purge | None = None, ttl_s: int = ABANDONED_TTL_S,
                 channel: str = keys.CHANGES_CHANNEL, idle_s: float = 5.0,
                 undo_timeout_s: float = UNDO_TIMEOUT_S,
                 lease_s: float = UNSENT_LEASE_S) -> None:
        self._purge = purge
        self._next_sweep = 0.0  # monotonic
        self._undo_timeout_s = undo_timeout_s
        # Creates to purge once Redis answers: (pipeline, batch) -> the Idempotency-Key
        # attempt that made it, if any.
        self._undone: dict[tuple[str, str], KeyHolder | None] = {}
        # Batches to abandon once Redis answers: (pipeline, batch) -> (version, reason,
        # released, the Idempotency-Key attempt if any)
        self._unhidden: dict[tuple[str, str], tuple[str, str, bool, KeyHolder | None]] = {}
        self._stops: set[str] = set()  # `STOPS` members to record once Redis answers
        self._redis = redis
        self._scripts = scripts
        self._sender = sender
        self._ttl_s = ttl_s
        self._channel = channel
        self._idle_s = idle_s
        self._wake = asyncio.Event()
        self.unsent = UnsentRuns(redis, scripts, sender, lease_s=lease_s, wake=self._wake.set,
                                 abandon=lambda p, b, v, why: self.abandon(p, b, v, why,
                                                                           released=False),
                                 queue_delete=lambda p, b, v: self.queue_delete(p, b, v, False))

    def sent(self, pipeline_id: str, batch_id: str) -> None:
        self.unsent.sent(pipeline_id, batch_id)

    async def sweep_once(self) -> int:
        return await self.unsent.sweep_once()

    async def abandon(self, pipeline_id: str, batch_id: str, version: str, reason: str, *,
                      released: bool, holder: KeyHolder | None = None) -> None:
        """Hides the batch as `stop`/`failed` and records that its delete must be queued.
        `released`: the request that made the batch released its Idempotency-Key (a POST
        answered 503); its delete says so, so a rebuild does not restore the key's record
        (a DELETE answered 200 released nothing: its batch's key stays taken).
        With Redis away, the batch is abandoned once it answers, by this process (its
        command, a POST's run or a DELETE's delete, may be on the topic), and the error is
        raised still: answered 503, since only this process's memory holds what is left to
        do (a POST's batch will not run; a DELETE may still happen, and its retry is safe).
        `holder`: the POST's Idempotency-Key attempt; the batch is left alone once the key
        holds it for another attempt or committed it (`HOLD_FOR_UNDO`)."""
        try:
            await self._abandon(pipeline_id, batch_id, version, reason, released, holder)
        except Exception as exc:
            if classify(exc) is not Verdict.UNAVAILABLE:
                raise
            log.warning("batch %s/%s: not abandoned yet (%s); abandoned once Redis answers",
                        pipeline_id, batch_id, describe(exc))
            self._unhidden[(pipeline_id, batch_id)] = (version, reason, released, holder)
            self._wake.set()
            raise

    async def _abandon(self, pipeline_id: str, batch_id: str, version: str, reason: str,
                       released: bool, holder: KeyHolder | None = None) -> None:
        if await self._ours(pipeline_id, batch_id, holder):
            await self._hide(pipeline_id, batch_id, version, reason, released)
            await self._release(holder)

    async def _ours(self, pipeline_id: str, batch_id: str, holder: KeyHolder | None) -> bool:
        """Whether the batch is still its failed request's to undo or abandon: always without
        an Idempotency-Key; with one, unless the key's record holds the batch for another
        attempt or committed it (a retry took the key over while this process could not
        reach Redis, and answered with the batch). Still the attempt's, the record's lease is
        renewed by the same script, so no take-over comes before `_release`."""
        if holder is None:
            return True
        if await self._scripts.hold_for_undo(keys=[holder.record_key],
                                             args=[holder.attempt, batch_id, holder.lease_ms]):
            return True
        log.warning("batch %s/%s: its request failed, but it is left as it is: a retry with "
                    "its Idempotency-Key took the key over and answers with it",
                    pipeline_id, batch_id)
        return False

    async def _release(self, holder: KeyHolder | None) -> None:
        """The key freed once its failed attempt's batch is undone or abandoned (a no-op when
        the request itself already released it): a retry then starts afresh."""
        if holder is not None:
            await self._scripts.release_key(keys=[holder.record_key], args=[holder.attempt])

    async def _hide(self, pipeline_id: str, batch_id: str, version: str, reason: str,
                    released: bool) -> None:
        # The outbox entry first: should the process die between the two, a delete of a
        # batch that was never hidden is harmless, a hidden batch nobody deletes is not.
        await self.queue_delete(pipeline_id, batch_id, version, released)
        await self._scripts.abandon_batch(
            keys=[keys.batch(pipeline_id, batch_id), keys.batch_index(pipeline_id),
                  keys.batch_seen(pipeline_id, batch_id), *keys.batch_filter_indexes(pipeline_id)],
            args=[batch_id, now_iso(), reason, self._ttl_s, self._channel],
        )
        # Hidden, it needs no run command: no sweep is to look at it again.
        await self._redis.zrem(keys.unsent_runs(pipeline_id), batch_id)
        log.warning("batch %s/%s abandoned: %s", pipeline_id, batch_id, reason)
        self._wake.set()

    async def queue_delete(self, pipeline_id: str, batch_id: str, version: str,
                           released: bool) -> None:
        """Enters the batch's delete command in the outbox (`keys.ABANDONED`), which this loop
        sends once Kafka takes it (`drain_once`)."""
        member = orjson.dumps([pipeline_id, batch_id, version, released]).decode()
        await self._redis.zadd(keys.ABANDONED, {member: time.time()})

    async def resend_stop(self, pipeline_id: str, batch_id: str, version: str) -> None:
        """Records a stop Kafka did not confirm, to be sent again until it does: the first
        may be written already, so the stop is under way either way. With Redis away it is
        recorded once Redis answers, by this process, and the error is raised (answered 503:
        only this process's memory holds it; a stop's retry is safe)."""
        member = orjson.dumps([pipeline_id, batch_id, version]).decode()
        try:
            await self._redis.zadd(STOPS, {member: time.time()})
        except Exception as exc:
            if classify(exc) is not Verdict.UNAVAILABLE:
                raise
            self._stops.add(member)
            self._wake.set()
            raise
        log.warning("batch %s/%s: its stop was not confirmed by Kafka; sent again once Kafka "
                    "takes it", pipeline_id, batch_id)
        self._wake.set()

    async def undo(self, pipeline_id: str, batch_id: str, *,
                   holder: KeyHolder | None = None) -> None:
        """Purges a batch whose create may have run though its request failed (no run
        command was sent for it): now if Redis answers within the bound, else later.
        `holder`: the POST's Idempotency-Key attempt, as for `abandon`."""
        if self._purge is None:
            return
        try:
            async with asyncio.timeout(self._undo_timeout_s):
                await self._purged(pipeline_id, batch_id, holder)
        except Exception as exc:
            log.warning("batch %s/%s: its create failed and is not undone yet (%s); purged "
                        "once Redis answers", pipeline_id, batch_id, describe(exc))
            self._undone[(pipeline_id, batch_id)] = holder
            self._wake.set()

    async def _purged(self, pipeline_id: str, batch_id: str, holder: KeyHolder | None) -> None:
        if await self._ours(pipeline_id, batch_id, holder):
            await self._undo(pipeline_id, batch_id)
            await self._release(holder)

    async def _undo(self, pipeline_id: str, batch_id: str) -> None:
        assert self._purge is not None
        fields = cast(dict[str, str], await self._redis.hgetall(keys.batch(pipeline_id,
                                                                           batch_id)))
        if is_visible(fields) and fields.get("state") != "pending":
            # This undo waited for Redis past the lease, and a sweep sent the run command
            # meanwhile, which a consumer took: purged, its flow run would run on with no
            # batch; abandoned, its delete cancels it.
            await self._hide(pipeline_id, batch_id, fields.get("pipeline_version", ""),
                             "its request failed, and its run was queued by another API "
                             "process before this one could undo it", True)
            return
        await self._purge(pipeline_id, batch_id)
        # Purged, it needs no run command: no sweep is to look at it again.
        await self._redis.zrem(keys.unsent_runs(pipeline_id), batch_id)

    async def finish(self, within_s: float) -> None:
        """At shutdown, once the loop is stopped: one more try of what this process alone
        holds (Redis may be back since its last round, up to its back-off ago). Left, an
        undo would let the unsent sweep run a batch whose POST was answered 503."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(within_s):
                await self._undo_pending()
        self.left_at_shutdown()

    def left_at_shutdown(self) -> None:
        """Says what this process alone still held to do (Redis away when it was asked):
        given up with the process, so each is logged for an operator to redo."""
        for pipeline_id, batch_id in sorted(self._undone):
            log.error("shutdown: batch %s/%s's failed create was never undone (purge it)",
                      pipeline_id, batch_id)
        for (pipeline_id, batch_id), _ in sorted(self._unhidden.items()):
            log.error("shutdown: batch %s/%s was never abandoned: its POST or DELETE was "
                      "answered 503 (delete it)", pipeline_id, batch_id)
        for member in sorted(self._stops):
            log.error("shutdown: stop %s was never recorded: its PUT was answered 503", member)

    def holds(self, pipeline_id: str, batch_id: str) -> bool:
        """Whether an undo or abandon of the batch waits for Redis in this process."""
        return (pipeline_id, batch_id) in self._undone or (pipeline_id, batch_id) in self._unhidden

    def undoing(self) -> int:
        """Creates still to undo, batches still to abandon and stops still to record."""
        return len(self._undone) + len(self._unhidden) + len(self._stops)

    async def _undo_pending(self) -> None:
        for member in sorted(self._stops):
            if await self._tried(f"stop {member}", self._redis.zadd(STOPS,
                                                                     {member: time.time()})):
                self._stops.discard(member)
        for (pipeline_id, batch_id), (version, reason, released, holder) in sorted(
                self._unhidden.items(), key=lambda item: item[0]):
            if await self._tried(f"abandon of {pipeline_id}/{batch_id}", self._abandon(
                    pipeline_id, batch_id, version, reason, released, holder)):
                del self._unhidden[(pipeline_id, batch_id)]
        if self._purge is None:
            return
        for (pipeline_id, batch_id), holder in sorted(self._undone.items(),
                                                      key=lambda item: item[0]):
            if await self._tried(f"undo of {pipeline_id}/{batch_id}",
                                 self._purged(pipeline_id, batch_id, holder)):
                del self._undone[(pipeline_id, batch_id)]
                log.info("batch %s/%s: its failed create undone", pipeline_id, batch_id)

    @staticmethod
    async def _tried(what: str, call: Awaitable[object]) -> bool:
        """True once `call` went through, or failed for good (logged and given up: kept, it
        would stop every entry after it at each round). Raises while Redis is away: the
        round ends, and the next tries again."""
        try:
            await call
        except Exception as exc:
            if classify(exc) is Verdict.UNAVAILABLE:
                raise
            log.error("%s failed and is given up: %s", what, describe(exc))
        return True

    async def drain_once(self) -> int:
        """Queues the outstanding deletes and stops Kafka takes now. Returns how many were
        queued."""
        done = 0
        for member in cast(list[str], await self._redis.zrange(STOPS, 0, 99)):
            pipeline_id, batch_id, version = orjson.loads(member)
            await self._sender.command(Command("stop", batch_id, pipeline_id,
                                               pipeline_version=version))
            await self._redis.zrem(STOPS, member)
            done += 1
        members = cast(list[str], await self._redis.zrange(keys.ABANDONED, 0, 99))
        for member in members:
            # Entries written before `released` was recorded were all marked.
            pipeline_id, batch_id, version, *rest = orjson.loads(member)
            released = bool(rest[0]) if rest else True
            # Marked when its run command carries an Idempotency-Key this process released
            # (a rebuild must leave it released).
            await self._sender.command(Command(
                "delete", batch_id, pipeline_id, pipeline_version=version,
                abandoned=True if released else msgspec.UNSET))
            await self._redis.zrem(keys.ABANDONED, member)
            done += 1
        return done

    async def run(self) -> None:
        """Runs until cancelled: drains the outbox whenever Kafka is reachable."""
        next_delay = RetryPolicy(initial_s=0.2, cap_s=2.0).delays()
        me = asyncio.current_task()
        while True:
            # A cancel a library swallowed on the way (seen: the API's shutdown waited on
            # this loop for ever) still ends it: the task stays marked as cancelling.
            if me is not None and me.cancelling():
                raise asyncio.CancelledError
            try:
                await self._undo_pending()
                await self.unsent.remove_acked()
                if self._sender.available:
                    await self.drain_once()
                    if time.monotonic() >= self._next_sweep:
                        await self.sweep_once()
                        # A few sweeps a lease: an entry waits at most a quarter more.
                        self._next_sweep = time.monotonic() + min(self.unsent.lease_s / 4,
                                                                  self._idle_s * 3)
                    next_delay = RetryPolicy(initial_s=0.2, cap_s=2.0).delays()
                    delay = self._idle_s
                else:
                    delay = next_delay()
            except Exception as exc:  # Kafka or Redis still away: retried, never dropped
                delay = next_delay()
                log.warning("abandoned batches: deletes or undos not done yet (%s), retry in "
                            "%.1fs", describe(exc), delay)
            self._wake.clear()
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass
