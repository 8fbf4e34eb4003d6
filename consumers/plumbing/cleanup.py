"""Durable clean-up of a batch's flow runs, off the commands' sequential path.

A delete command, a run whose batch vanished while Prefect created its flow run, and a run or
stop given up on each leave a job here and are committed at once; a background task does the
slow part (waiting for a cancellation to end, letting a finished run's events settle before
deleting it) for many batches at a time, so no other batch's command waits for it.

Jobs live in Redis, so a crash or a restart resumes them:
  keys.CLEANUP_DUE    sorted set  "<kind>/<pipeline_id>/<batch_id>" -> next pass (unix time)
  keys.CLEANUP_SINCE  hash        same member -> when the clean-up began (unix time)
Kinds: `delete` (cancel, then delete every flow run of the batch, then remove its data on
the worker's disk through the clean-up each of its step implementations declares, then purge
it from Redis, then tombstone its snapshot so a rebuild of Redis does not bring it back),
`cancel` (cancel every flow run of a batch that stays, `stop`/`failed`: a run it cancelled
itself (`keys.cleanup_cancelled`) has the failure said again just after its Cancelled, or
that Cancelled, the batch's latest stop, would read as if someone had stopped the batch)
and `stop` (a stop's
follow-up: a run found Pending is cancelled once its engine runs it, and one left
Cancelling with no engine to end it is ended; see `_settle`).

Ordering with creates: runs are found by the batch's tag, and a job is done only once a
pass after `cleanup_recheck_s` (more than a create's time-out window) found nothing left to
do; a flow run whose create was still in flight inside Prefect when the delete first looked
is therefore found and removed too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final, cast

from redis.asyncio import Redis

from consumers.plumbing.active import ActiveRuns
from consumers.plumbing.emit import Emitter
from consumers.plumbing.options import ConsumerOptions
from consumers.plumbing.prefect_api import PrefectGateway, RunState
from core import keys
from core.codec import Event, derived_id
from core.layout import is_visible
from core.registry import PipelineRegistry
from core.retry import describe
from core.scripts import Scripts
from core.settings import get_settings
from core.snapshots import SnapshotWriter
from core.step_catalogue import declarations, import_path
from core.store import BatchStore

log = logging.getLogger(__name__)
# The job kinds, and the message each one leaves on the flow runs it cancels (the jobs' keys:
# core.keys.CLEANUP_DUE and CLEANUP_SINCE; their layout in the module docstring).
KINDS: Final = ("delete", "cancel", "stop")
MESSAGES: Final = {"delete": "deleted through the batches API",
                   "cancel": "the batch failed: its command was given up",
                   "stop": "stopped through the batches API"}


def member(kind: str, pipeline_id: str, batch_id: str) -> str:
    return f"{kind}/{pipeline_id}/{batch_id}"  # ids never hold '/' (core.models.ID_PATTERN)


class Cleanup:
    def __init__(self, redis: Redis, prefect: PrefectGateway, store: BatchStore,
                 active: ActiveRuns, options: ConsumerOptions, stopping: asyncio.Event, *,
                 data_root: Path | None = None, snapshots: SnapshotWriter | None = None,
                 emitter: Emitter | None = None) -> None:
        self._redis = redis
        self._emitter = emitter  # a `cancel` job's failure said again
        self._snapshots = snapshots  # the purge's tombstone on the snapshots topic
        # Where the steps wrote the batch's data (DHUB_DATA_DIR): the worker's, on this host.
        self._data_root = data_root if data_root is not None else get_settings().data_root
        self._prefect = prefect
        self._store = store
        self._active = active
        self._options = options
        self._stopping = stopping
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self.passes = 0  # for tests and logs

    async def enqueue(self, kind: str, pipeline_id: str, batch_id: str) -> None:
        """Idempotent: a job already queued keeps its start (a re-delivered delete does
        not push its end further away)."""
        job = member(kind, pipeline_id, batch_id)
        now = time.time()
        async with self._redis.pipeline(transaction=True) as tx:
            tx.hsetnx(keys.CLEANUP_SINCE, job, repr(now))
            tx.zadd(keys.CLEANUP_DUE, {job: now}, nx=True)
            await tx.execute()

    async def pending(self) -> list[str]:
        return cast(list[str], await self._redis.zrange(keys.CLEANUP_DUE, 0, -1))

    # -- the background task -------------------------------------------------------------

    async def run(self) -> None:
        """Until stopping: claims due jobs and runs one pass of each, concurrently."""
        try:
            while not self._stopping.is_set():
                try:
                    await self._claim_due()
                except Exception as exc:  # Redis down: the jobs wait in Redis
                    log.warning("clean-up: jobs not read: %s", describe(exc))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._options.cleanup_poll_s):
                        await self._stopping.wait()
        finally:
            # A pass cut short is run again from the start, here or by another process.
            if self._inflight:
                await asyncio.wait(self._inflight.values(),
                                   timeout=self._options.prefect_timeout_s)
                for task in self._inflight.values():
                    task.cancel()

    async def _claim_due(self) -> None:
        room = self._options.cleanup_concurrency - len(self._inflight)
        if room <= 0:
            return
        now = time.time()
        due = cast(list[str], await self._redis.zrangebyscore(
            keys.CLEANUP_DUE, "-inf", now, start=0, num=room + len(self._inflight)))
        for job in due:
            if job in self._inflight or len(self._inflight) >= self._options.cleanup_concurrency:
                continue
            # Claimed by moving its due time past the lease; another process reading the
            # same entry at the same moment may run the same pass (every step is idempotent).
            claimed = await self._redis.zadd(
                keys.CLEANUP_DUE, {job: now + self._options.cleanup_lease_s}, xx=True, gt=True, ch=True)
            if claimed:
                task = asyncio.create_task(self._job(job), name=f"cleanup {job}")
                self._inflight[job] = task
                task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        for job, running in list(self._inflight.items()):
            if running is task:
                del self._inflight[job]

    async def _job(self, job: str) -> None:
        try:
            since_raw = await self._redis.hget(keys.CLEANUP_SINCE, job)
            since = float(since_raw) if since_raw is not None else time.time()
            kind, pipeline_id, batch_id = job.split("/", 2)
            next_due = await self.one_pass(kind, pipeline_id, batch_id, since)
            self.passes += 1
            if next_due is None:
                async with self._redis.pipeline(transaction=True) as tx:
                    tx.zrem(keys.CLEANUP_DUE, job)
                    tx.hdel(keys.CLEANUP_SINCE, job)
                    tx.delete(keys.cleanup_cancelled(job))
                    await tx.execute()
                log.info("clean-up %s: done", job)
            else:
                await self._redis.zadd(keys.CLEANUP_DUE, {job: next_due}, xx=True)
        except Exception as exc:
            # Retried at the next pass; a job whose data is wrong would loop, so say so.
            log.warning("clean-up %s: pass failed (%s); retried", job, describe(exc),
                        exc_info=not isinstance(exc, OSError | TimeoutError))
            with contextlib.suppress(Exception):
                await self._redis.zadd(
                    keys.CLEANUP_DUE, {job: time.time() + self._options.retry_max_s}, xx=True)

    async def one_pass(self, kind: str, pipeline_id: str, batch_id: str,
                       since: float) -> float | None:
        """Does what can be done now without waiting; returns when to look again, or None
        when the batch has no flow run left to clean and the create window is over."""
        fields = await self._store.fields(pipeline_id, batch_id)
        if kind == "delete" and fields is not None and is_visible(fields):
            # Every delete hides its batch before its job is queued (the API, the commands
            # consumer, the abandoner, a rebuild), so a visible batch of this id was created
            # after the delete (a published id, deleted before its run came): not its to end.
            log.info("clean-up delete/%s/%s: the batch of this id was created after the "
                     "delete; left alone", pipeline_id, batch_id)
            return None
        if kind == "delete" and fields is not None:
            resumes = await self._store.live_resumes(pipeline_id, batch_id)
            if resumes:
                # They take the files over when their first step starts. The API refuses
                # such a delete (409); one that came another way (published, or racing the
                # resume) waits here, the batch hidden, until they stopped. Looked at before
                # Prefect is asked anything: a resume may wait in its queue for hours.
                log.info("clean-up delete/%s/%s: its data waits for resumes %s",
                         pipeline_id, batch_id, ", ".join(resumes))
                return time.time() + self._options.cleanup_resume_poll_s
        known = fields.get("flow_run_id") if fields else None
        runs = await self._prefect.of_batch(pipeline_id, batch_id, known)
        now = time.time()
        waiting = False
        ours: set[str] = set()
        if kind == "cancel":
            # Noted before they are cancelled (a pass cut short in between must not leave a
            # Cancelled of ours unknown). One found Cancelling already was someone else's (a
            # given-up stop's that reached Prefect): its Cancelled is a real stop.
            noted = keys.cleanup_cancelled(member(kind, pipeline_id, batch_id))
            to_cancel = [r.flow_run_id for r in runs
                         if not r.final and r.state_type != "CANCELLING"]
            if to_cancel:
                await self._redis.sadd(noted, *to_cancel)
            ours = cast(set[str], await self._redis.smembers(noted))
        for run in runs:
            settled = await self._settle(kind, run, now - since, now)
            waiting |= settled is None
            if (settled is not None and settled.state_type == "CANCELLED"
                    and settled.flow_run_id in ours):
                await self._fail_again(pipeline_id, batch_id, settled, fields)
        if waiting:
            return now + self._options.cleanup_poll_s
        # A stop's runs were all created before it (same partition, in order): no window.
        window_end = since + (0.0 if kind == "stop" else self._options.cleanup_recheck_s)
        if now < window_end:
            return window_end
        if kind == "delete":
            if fields is not None:
                # No run is left to write more, and the hash still says which steps ran.
                await self._remove_data(pipeline_id, batch_id, fields)
            await self._active.remove(pipeline_id, batch_id)
            if fields is not None:
                await self._store.purge(pipeline_id, batch_id, fields)  # read above
            if self._snapshots is not None:
                # After the purge (a snapshot written before it would outlive the tombstone
                # otherwise), and again on a pass that finds the hash gone already: a
                # pass cut short between the two still owes it. A Kafka error fails the
                # pass, run again later; without the tombstone a rebuild brings the batch back.
                await self._snapshots.tombstone(pipeline_id, batch_id)
        return None

    async def _remove_data(self, pipeline_id: str, batch_id: str,
                           fields: Mapping[str, str]) -> None:
        """Calls each clean-up the batch's step implementations declare, once each. They are
        idempotent, so a pass cut short is simply run again; one that raises fails the pass,
        retried later, and the batch is purged only once its data is gone."""
        version = fields.get("pipeline_version")
        registry = PipelineRegistry(self._redis, Scripts(self._redis))
        spec = await registry.get(pipeline_id, version) if version else None
        if spec is None:
            return  # versions are never removed; a hash without one predates the registry
        done: set[str] = set()
        for step in spec.steps:
            declared = declarations().get(step.uses)
            if declared is None:
                log.warning("clean-up of %s/%s: step %s uses %s, not installed here; its data "
                            "(if any) is left", pipeline_id, batch_id, step.name, step.uses)
                continue
            if declared.cleanup is None or declared.cleanup in done:
                continue
            done.add(declared.cleanup)
            remove = import_path(declared.cleanup)
            # File-system work: off the loop that drives the other jobs and the commands.
            await asyncio.to_thread(remove, self._data_root, batch_id)

    async def _fail_again(self, pipeline_id: str, batch_id: str, run: RunState,
                          fields: Mapping[str, str] | None) -> None:
        """A given-up batch's failure, said again just after the Cancelled its clean-up
        brought its run to: that Cancelled is the give-up's own doing, not a stop. The same
        event on every pass (its id from the state's): applied once."""
        if self._emitter is None or run.state_id is None or run.since is None:
            return
        reason = MESSAGES["cancel"]
        if fields is not None and fields.get("outcome") == "failed" and fields.get("reason"):
            reason = fields["reason"]  # the give-up's own, while the batch still shows it
        await self._emitter.emit([Event(
            type="batch.state", batch_id=batch_id, pipeline_id=pipeline_id,
            event_id=derived_id("failed-after-", run.state_id), state="stop", outcome="failed",
            reason=reason, flow_run_id=run.flow_run_id, ts=run.since.timestamp() + 0.001,
        )])  # fmt: skip

    async def _settle(self, kind: str, run: RunState, age: float,
                      now: float) -> RunState | None:
        """One flow run one step further; the run as it is once nothing is left to do for it,
        else None."""
        message = MESSAGES[kind]
        if kind == "stop" and run.state_type == "PENDING" \
                and age < self._options.stop_pending_wait_s:
            # Claimed by a worker, not started: cancelling now races the engine (the worker
            # would mark it Cancelled without a process to end, and the engine may then
            # still run it to Completed). Once Running, Cancelling is the engine's to end.
            return None
        if not run.final and run.state_type != "CANCELLING":
            run = await self._prefect.cancel(run, message)
        if kind in ("stop", "cancel") and run.state_type == "CANCELLING":
            # The worker ends a Cancelling run within seconds. One that stays Cancelling
            # has no engine left: it finished meanwhile and Prefect refused its Completed
            # (only Cancelled may follow Cancelling), so nobody would ever end it. Ended
            # here, Cancelled: the batch then reports the final state Prefect holds.
            stuck = now - run.since.timestamp() if run.since is not None else 0.0
            # Never started: its worker ends it, so wait longer for that; past the wait no
            # worker is coming. Forcing Cancelled may still let a late engine run it to
            # Completed — then that later final state decides the batch's outcome too.
            wait = (self._options.stop_cancelling_wait_s if run.ran
                    else self._options.stop_unstarted_wait_s)
            if stuck < wait:
                return None
            run = await self._prefect.force_cancelled(run, message)
        if not run.final:
            if kind != "delete":
                return None  # Cancelling: its worker ends it, looked at again
            if age < self._options.delete_cancel_wait_s:
                return None
            # The worker did not end it in time: deleted anyway, Cancelled first so a
            # worker that still holds it stops it when it next looks.
            run = await self._prefect.force_cancelled(run, message)
        if kind != "delete":
            return run
        if run.ran and run.since is not None and \
                now - run.since.timestamp() < self._options.delete_settle_s:
            # A run that executed has task-run events the server may not have stored yet;
            # deleting the run under them breaks Prefect's task-run recorder (foreign keys).
            return None
        await self._prefect.delete(run.flow_run_id)
        return run
