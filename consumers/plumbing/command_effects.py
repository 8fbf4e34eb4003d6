"""What each command does, once the commands consumer (consumers.commands) hands it over: a
run creates its flow run on Prefect, a stop cancels it, a delete hides the batch and queues its
clean-up, a deploy prepares a new version's deployment. Each is idempotent (the consumer's
docstring says how), so a command delivered again has no second effect."""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from redis.exceptions import RedisError

from consumers.plumbing.active import ActiveRuns
from consumers.plumbing.cleanup import Cleanup
from consumers.plumbing.creation import Creations
from consumers.plumbing.deployments import Deployments
from consumers.plumbing.emit import Emitter
from consumers.plumbing.prefect_api import (
    PrefectGateway,
    RunState,
    not_found,
    of_an_earlier_batch,
    of_another_pipeline,
)
from core import keys
from core.codec import Command, Event, Run, derived_id
from core.layout import CONFIG, is_visible
from core.messages import MAX_TS_AHEAD_S
from core.models import PipelineSpec, iso_of
from core.prefect_events import flow_state_event
from core.registry import PipelineRegistry
from core.restore_runs import recorded_of
from core.retry import Permanent
from core.run_config import ConfigRefused, effective_config
from core.snapshots import SnapshotWriter
from core.store import BatchStore

log = logging.getLogger(__name__)
STOP_MESSAGE = "stopped through the batches API"


class CommandEffects:
    def __init__(self, store: BatchStore, registry: PipelineRegistry, creations: Creations,
                 active: ActiveRuns, deployments: Deployments, prefect: PrefectGateway,
                 emitter: Emitter, snapshots: SnapshotWriter, cleanup: Cleanup, *,
                 work_pool: str | None = None) -> None:
        self.store = store
        self.work_pool = work_pool  # whose worker is told of each run created (None: none)
        self.registry = registry
        self.creations = creations
        self.active = active
        self.deployments = deployments
        self.prefect = prefect
        self.emitter = emitter
        self.snapshots = snapshots
        self.cleanup = cleanup

    async def apply(self, command: Command) -> None:
        if command.type == "run":
            await self.run(command)
        elif command.type == "stop":
            await self.stop(command)
        elif command.type == "deploy":
            await self.deploy(command)
        else:
            await self.delete(command)

    async def deploy(self, command: Command) -> None:
        """Creates or updates the pipeline version's deployment right after registration,
        so its first run does not pay for it (a run ensures it again if it went missing)."""
        spec = await self.registry.get(command.pipeline_id, command.pipeline_version)
        if spec is None:
            raise Permanent(f"unknown pipeline version {command.pipeline_id!r} "
                            f"{command.pipeline_version!r}")
        self.deployments.forget(command.pipeline_id, spec.version)
        deployment_id = await self.deployments.id_for(command.pipeline_id, spec)
        log.info("deploy %s %s: deployment %s", command.pipeline_id, spec.version, deployment_id)

    async def _fields(self, command: Command) -> dict[str, str] | None:
        fields = await self.store.fields(command.pipeline_id, command.batch_id)
        return fields if is_visible(fields) else None

    async def run(self, command: Command) -> None:
        if (isinstance(command, Run) and command.creation is not None
                and not await self.creations.ensure(command)):
            return  # its batch was deleted: the same id stays deleted
        fields = await self._fields(command)
        if fields is None and isinstance(command, Run):
            fields = await self._restored(command)
        if fields is not None and fields.get("state") == "pending":
            # Its creation's durable record, before its flow run exists: every later change
            # comes from an event, snapshotted by the events consumer after this one.
            await self.snapshots.write(command.pipeline_id, command.batch_id, fields)
        if fields is None or fields.get("state") == "stop":
            log.info("run %s skipped: batch %s", command.batch_id,
                     "gone" if fields is None else "already stopped")
            return
        if fields.get("state") != "pending" and fields.get("flow_run_id"):
            # Its flow run exists (redelivered after a rebalance, sent again by the API's
            # unsent sweep or a key take-over). Created again, it would be the same run, but a
            # Prefect answering 5xx meanwhile would have this command given up, and the
            # give-up fail the batch and cancel the very run the first command made.
            await self.active.add(command.pipeline_id, command.batch_id)
            log.info("run %s skipped: its flow run %s exists", command.batch_id,
                     fields["flow_run_id"])
            return
        version = fields.get("pipeline_version") or command.pipeline_version
        spec = await self.registry.get(command.pipeline_id, version or None)
        if spec is None:
            raise Permanent(f"unknown pipeline version {command.pipeline_id!r} {version!r}")
        run = await self._create_run(command, spec.version, spec, fields.get("created_at", ""))
        await self._nudge_worker()
        await self.active.add(command.pipeline_id, command.batch_id)
        await self.emitter.emit([Event(
            type="batch.state", batch_id=command.batch_id, pipeline_id=command.pipeline_id,
            event_id=f"sched-{run.flow_run_id}", state="scheduled", flow_run_id=run.flow_run_id,
        )])  # fmt: skip
        log.info("run %s: flow run %s (%s)", command.batch_id, run.flow_run_id, run.state_type)
        if await self._fields(command) is None:
            # Deleted while Prefect created the run (the delete may have looked before it
            # existed): the clean-up removes it, so no flow run outlives its batch.
            log.info("run %s: batch deleted meanwhile, flow run cleaned up", command.batch_id)
            await self.cleanup.enqueue("delete", command.pipeline_id, command.batch_id)

    async def _nudge_worker(self) -> None:
        """Tells the work pool's worker a run is waiting (`keys.WORKER_NUDGES_CHANNEL`), so it
        starts it now, not up to a poll interval later. Best effort: a nudge lost (Redis
        unavailable this instant) leaves the run to the worker's next poll, and must not
        fail the command whose run exists."""
        if self.work_pool is None:
            return
        try:
            await self.store.redis.publish(keys.WORKER_NUDGES_CHANNEL, self.work_pool)
        except RedisError as exc:
            log.info("worker nudge not sent (%s): the run waits for the worker's poll", exc)

    async def _restored(self, command: Run) -> dict[str, str] | None:
        """The batch of an API's run command that Redis lost (an AOF that lost its last
        second, a restart without persistence) written again from what the command recorded
        (`Recorded`), as a rebuild would: the API answered its POST, so it must run, not be
        skipped as gone. Lost is no hash and no purge mark (`keys.batch_purged`: a batch
        deleted, undone or removed by retention leaves one for a day); a hidden batch's hash
        is there. A command older than that day is left alone: a batch gone on purpose may
        have outlived its mark (an abandoned POST's hidden hash expires after a day too).
        Its sequence is a new one (the lost counter may have handed out its old one again),
        and its run goes on as any other's."""
        recorded = recorded_of(command)
        if recorded is None or time.time() - command.ts > keys.PURGED_MARK_S:
            return None
        pipeline_id, batch_id = command.pipeline_id, command.batch_id
        if await self.store.redis.exists(keys.batch(pipeline_id, batch_id),
                                         keys.batch_purged(pipeline_id, batch_id)):
            return None
        spec = await self.registry.get(pipeline_id, command.pipeline_version)
        if spec is None:
            return None
        if recorded.created_at > iso_of(time.time() + MAX_TS_AHEAD_S):
            # Written as it is, later creates would take it as the newest batch's time.
            raise Permanent(f"the recorded created_at {recorded.created_at} is more than a "
                            "day ahead")
        config = recorded.extra.get(CONFIG)
        if config is not None:
            # The API checked it against this version; a record published otherwise may
            # name a config its steps refuse, which a `create` would have had refused. Judged
            # as held values are (a version registered before a step's model was tightened
            # runs as it always did), for the version's steps only.
            held: dict[str, Any] = orjson.loads(config)
            unknown = sorted(set(held) - set(spec.step_names))
            if unknown:
                raise Permanent("the recorded config is refused: " + "; ".join(
                    f"config.{name}: no such step" for name in unknown))
            try:
                effective_config(spec, None, base=held)
            except ConfigRefused as exc:
                raise Permanent(f"the recorded config is refused: {exc}") from None
        if not await self.store.create(pipeline_id, batch_id, spec, extra=recorded.extra,
                                       created_at=recorded.created_at):
            return None
        log.warning("run %s: its batch was missing from Redis with no purge behind it (Redis "
                    "lost it): written again from its run command", batch_id)
        return await self._fields(command)

    async def _create_run(self, command: Command, version: str, spec: PipelineSpec,
                          created_at: str) -> RunState:
        for attempt in (1, 2):
            deployment_id = await self.deployments.id_for(command.pipeline_id, spec)
            try:
                run = await self.prefect.create_run(deployment_id, command.batch_id,
                                                    command.pipeline_id, version)
                if of_another_pipeline(run, command.pipeline_id):
                    # The id is another pipeline's batch's too (published to this one): its
                    # run must not stand for this one, nor be stopped or deleted with it.
                    why, key = "is another pipeline's", f"{command.pipeline_id}/{command.batch_id}"
                elif of_an_earlier_batch(run, created_at):
                    # The id was used before, by a batch long gone (its record and its
                    # published claim expired): that batch's run must not stand for this one.
                    why, key = "predates the batch", command.batch_id
                else:
                    return run
                log.warning("run %s: Prefect's run %s of the same id %s; a run of this "
                            "batch's own is created", command.batch_id, run.flow_run_id, why)
                return await self.prefect.create_run(
                    deployment_id, command.batch_id, command.pipeline_id, version,
                    key=f"{key}@{created_at}")
            except Exception as exc:
                if not not_found(exc):
                    raise
                # Deleted behind our back: ensure it again once, then give up.
                self.deployments.forget(command.pipeline_id, version)
                if attempt == 2:
                    raise Permanent(f"deployment of {spec.name!r} missing after ensure") \
                        from None
        raise AssertionError("unreachable")

    async def stop(self, command: Command) -> None:
        fields = await self._fields(command)
        if fields is None or fields.get("state") == "stop":
            return
        runs = await self.prefect.of_batch(command.pipeline_id, command.batch_id,
                                           fields.get("flow_run_id"),
                                           created_at=fields.get("created_at", ""))
        events: list[Event] = []
        if not runs:
            events.append(Event(
                type="batch.state", batch_id=command.batch_id, pipeline_id=command.pipeline_id,
                event_id=derived_id("stop-", command.batch_id), state="stop", outcome="cancelled",
                reason="stopped before it started",
            ))  # fmt: skip
        follow_up = False
        for run in runs:
            if run.state_type == "PENDING":
                # A worker is starting it: a cancellation now races the engine (the worker
                # marks it Cancelled, the engine may still run it). It is cancelled once
                # running instead, by the engine's own cancellation (consumers.plumbing.cleanup).
                follow_up = True
                continue
            now = await self.prefect.cancel(run, STOP_MESSAGE)
            # A run that was Scheduled is Cancelled now; a started one is Cancelling, and
            # its final state arrives from Prefect (bridge, hooks), whatever it is; the
            # follow-up sees that it does arrive.
            follow_up |= not now.final
            if now.final and now.state_type is not None and now.state_id is not None:
                event = flow_state_event(
                    pipeline_id=command.pipeline_id, batch_id=command.batch_id,
                    flow_run_id=now.flow_run_id, state_type=now.state_type,
                    state_id=now.state_id, message=now.message,
                    # When Prefect entered the state, not when we saw it: the latest stop
                    # decides a batch's outcome.
                    ts=now.since.timestamp() if now.since is not None else None,
                )
                if event is not None:
                    events.append(event)
        if events:
            await self.emitter.emit(events)
        if follow_up:
            await self.cleanup.enqueue("stop", command.pipeline_id, command.batch_id)
        log.info("stop %s: %s", command.batch_id,
                 ", ".join(f"{r.flow_run_id} {r.state_type}" for r in runs) or "no flow run")

    async def delete(self, command: Command) -> None:
        """Hides the batch (the API did already, unless replayed) and leaves its flow runs and
        its purge to the clean-up, which runs off this path: the slow part of a delete
        (waiting for a running flow to end, letting its events settle) holds up nobody."""
        fields = await self.store.fields(command.pipeline_id, command.batch_id)
        if is_visible(fields):
            await self.store.hide(command.pipeline_id, command.batch_id)
        await self.active.remove(command.pipeline_id, command.batch_id)
        await self.creations.deleted(command.pipeline_id, command.batch_id)
        await self.cleanup.enqueue("delete", command.pipeline_id, command.batch_id)
        log.info("delete %s: hidden, clean-up queued", command.batch_id)
