"""The reconciler: batches Redis shows as live, checked against Prefect now and then.

Events can be missed — the bridge was down longer than Prefect's backfill window, a worker
was killed before the flow's hooks ran, a webhook was lost — and a run can die with its
machine, leaving Prefect to believe it still runs (caught by its missing heartbeats).
Every round takes the least recently checked batches of the active-runs index, reads their
flow runs (chunked to Prefect's page limit) and publishes whatever state Prefect has that
Redis lacks. A terminal state is named after Prefect's state id, like the bridge names it,
so both arriving is harmless. A batch indexed before its run id was recorded is looked up by
its tag. A batch that reads `stop` leaves the index once its run is final no later than the
stop it shows: Prefect lets a Cancelled run go Running and then Completed (a stop's
cancel that lost the race to a starting engine), and a later end whose events were lost is
published as any missed state. After each round, a bounded orphan sweep
(`consumers.plumbing.orphans`) cancels the runs whose batch is gone, hidden or stopped.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Final

from redis.asyncio import Redis

from consumers.plumbing.active import ActiveRuns
from consumers.plumbing.emit import Emitter
from consumers.plumbing.options import ConsumerOptions
from consumers.plumbing.orphans import OrphanOptions, OrphanSweep
from consumers.plumbing.part import Clients, Part
from consumers.plumbing.prefect_api import PrefectGateway, RunState
from core import keys
from core.codec import Event, derived_id
from core.layout import BATCH_RANK, DELETED, STEP_PREFIX, STEP_RANK, running_steps
from core.packing import unpacked
from core.prefect_events import FLOW_STATES, flow_state_event, state_time
from core.retry import describe
from core.settings import Settings

log = logging.getLogger(__name__)
# Batches looked up by tag per round (one Prefect call each); the rest wait their turn.
UNRECORDED_PER_ROUND: Final = 50


class Reconciler(Part):
    name = "reconciler"

    def __init__(self, settings: Settings, options: ConsumerOptions | None = None, *,
                 orphans: OrphanOptions | None = None, orphan_scope: list[str] | None = None,
                 ) -> None:
        super().__init__()
        self.settings = settings
        self.options = options or ConsumerOptions()
        self.orphan_options = orphans or OrphanOptions()
        self._orphan_scope = orphan_scope
        self.sweep: OrphanSweep | None = None
        self._redis: Redis | None = None
        self.prefect: PrefectGateway | None = None
        self.rounds = 0
        self.published = 0

    async def _open(self, clients: Clients, scope: contextlib.AsyncExitStack) -> None:
        self._redis = redis = clients.redis
        self.active = ActiveRuns(redis)
        self.prefect = prefect = PrefectGateway(self.settings, self.options.prefect_timeout_s)
        await prefect.open()
        scope.push_async_callback(prefect.close)
        if self.orphan_options.enabled:
            self.sweep = OrphanSweep(redis, prefect, self.orphan_options,
                                     scope=self._orphan_scope)
        self.emitter = Emitter(clients.producer, self.settings.topic_events)

    async def _loop(self) -> None:
        while not await self.sleep(self.options.reconcile_interval_s):
            try:
                await self.reconcile()
            except Exception as exc:  # a dependency down: the next round tries again
                log.warning("reconcile round failed: %s", describe(exc))
            if self.sweep is not None:
                try:
                    await self.sweep.sweep()
                except Exception as exc:
                    log.warning("orphan sweep failed: %s", describe(exc))
            self.rounds += 1

    async def reconcile(self) -> list[Event]:
        """One round; returns the events it published."""
        assert self.prefect is not None and self._redis is not None
        due = await self.active.due(self.options.reconcile_batch)
        if not due:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for pipeline_id, batch_id in due:
                pipe.hmget(keys.batch(pipeline_id, batch_id), "state", "flow_run_id", DELETED,
                           "created_at")
            rows: list[list[str | None]] = await pipe.execute()
        live: dict[str, tuple[str, str, str]] = {}  # flow run id -> (pipeline, batch, state)
        unrecorded: list[tuple[str, str, str, str]] = []
        stopped: list[tuple[str, str]] = []
        for (pipeline_id, batch_id), (state, flow_run_id, deleted, created_at) in zip(
                due, rows, strict=True):
            if state is None or deleted is not None:
                await self.active.remove(pipeline_id, batch_id)
            elif state == "stop":
                stopped.append((pipeline_id, batch_id))
            elif flow_run_id is None:
                unrecorded.append((pipeline_id, batch_id, state, created_at or ""))
            else:
                live[flow_run_id] = (pipeline_id, batch_id, state)
        ended = await self._stopped_runs(stopped)
        runs = await self.prefect.read([*live, *ended])
        late, settled = self._settle_stopped(ended, runs)
        runs.update(await self._find_unrecorded(unrecorded, live))
        await self._crash_zombies(runs)
        events: list[Event] = []
        for flow_run_id, (pipeline_id, batch_id, state) in live.items():
            run = runs.get(flow_run_id)
            event: Event | None
            if run is None:
                # A guess (ts 0): a run deleted after it ended may still have its real end
                # on the way (the bridge behind), which must win however late.
                event = Event(
                    type="batch.state", batch_id=batch_id, pipeline_id=pipeline_id,
                    event_id=derived_id("gone-", flow_run_id), state="stop", outcome="crashed",
                    reason="the flow run no longer exists in Prefect", flow_run_id=flow_run_id,
                    ts=0.0,
                )  # fmt: skip
            elif run.state_type is None or run.state_id is None:
                continue
            else:
                mapped = FLOW_STATES.get(run.state_type)
                if mapped is None or BATCH_RANK[mapped[0]] <= BATCH_RANK.get(state, 0):
                    continue
                event = flow_state_event(
                    pipeline_id=pipeline_id, batch_id=batch_id, flow_run_id=flow_run_id,
                    state_type=run.state_type, state_id=run.state_id, message=run.message,
                    ts=run.since.timestamp() if run.since is not None else None,
                    started=run.ran,
                )
            if event is not None:
                events.append(event)
        events = await self._with_unfinished_steps(events + late)
        if events:
            await self.emitter.publish(events)
            self.published += len(events)
            log.info("reconciler: published %d missed state(s): %s", len(events),
                     ", ".join(f"{e.batch_id} {e.state}" for e in events))
        # Only once what they owe is published: a round that fails before leaves them
        # indexed for the next.
        for pipeline_id, batch_id in settled:
            await self.active.remove(pipeline_id, batch_id)
        return events

    async def _stopped_runs(self, stopped: list[tuple[str, str]]
                            ) -> dict[str, tuple[str, str, float]]:
        """The flow runs of batches that read `stop`: run id -> (pipeline, batch, the stop's
        ts). One without a recorded run leaves the index (nothing to check it against). Read
        whole: a stopped batch's hash may be packed (its run id inside)."""
        assert self._redis is not None
        if not stopped:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for pipeline_id, batch_id in stopped:
                pipe.hgetall(keys.batch(pipeline_id, batch_id))
            hashes: list[dict[str, str]] = await pipe.execute()
        ended: dict[str, tuple[str, str, float]] = {}
        for (pipeline_id, batch_id), raw in zip(stopped, hashes, strict=True):
            fields = unpacked(raw) if raw else {}
            flow_run_id = fields.get("flow_run_id")
            if flow_run_id:
                ended[flow_run_id] = (pipeline_id, batch_id, float(fields.get("stop_ts") or 0))
            else:
                await self.active.remove(pipeline_id, batch_id)
        return ended

    @staticmethod
    def _settle_stopped(ended: dict[str, tuple[str, str, float]], runs: dict[str, RunState]
                        ) -> tuple[list[Event], list[tuple[str, str]]]:
        """Stopped batches done with: their run final (or gone) at or before the stop they
        show, or final later (that end's events lost: returned to publish). One whose run is
        live again stays indexed."""
        events: list[Event] = []
        settled: list[tuple[str, str]] = []
        for flow_run_id, (pipeline_id, batch_id, stop_ts) in ended.items():
            run = runs.get(flow_run_id)
            if run is not None and not run.final:
                continue  # live again (a Cancelled that lost the race): looked at again
            if (run is not None and run.since is not None and run.state_type is not None
                    and run.state_id is not None and run.since.timestamp() > stop_ts + 0.001):
                event = flow_state_event(
                    pipeline_id=pipeline_id, batch_id=batch_id, flow_run_id=flow_run_id,
                    state_type=run.state_type, state_id=run.state_id, message=run.message,
                    ts=run.since.timestamp(), started=run.ran)
                if event is not None:
                    events.append(event)
            settled.append((pipeline_id, batch_id))
        return events, settled

    async def _find_unrecorded(self, unrecorded: list[tuple[str, str, str, str]],
                               live: dict[str, tuple[str, str, str]]) -> dict[str, RunState]:
        """The flow runs of indexed batches whose run id Redis has not recorded yet (the
        command's event was lost), found by the batch's tag and added to `live`. A batch
        without any run is left alone: its run may not be created yet. The run of an earlier
        batch of the same id (published again after it expired) shares the tags: not this
        batch's."""
        assert self.prefect is not None
        found: dict[str, RunState] = {}
        for pipeline_id, batch_id, state, created_at in unrecorded[:UNRECORDED_PER_ROUND]:
            runs = await self.prefect.of_batch(pipeline_id, batch_id, created_at=created_at)
            if not runs:
                continue
            run = next((r for r in runs if not r.final), runs[0])
            live[run.flow_run_id] = (pipeline_id, batch_id, state)
            found[run.flow_run_id] = run
        return found

    async def _with_unfinished_steps(self, events: list[Event]) -> list[Event]:
        """Before each stop, the final states Prefect holds for the batch's steps not final
        in Redis (the bridge was down past Prefect's backfill, so their task-run events are
        lost), then `failed` for the steps still running after an unsuccessful stop: nothing
        else will report them when the run died with its process (no task-run event, no
        hook). Without the first, a run repaired as completed kept a step `running`."""
        assert self._redis is not None and self.prefect is not None
        stops = [e for e in events if e.state == "stop"]
        if not stops:
            return events
        async with self._redis.pipeline(transaction=False) as pipe:
            for e in stops:
                pipe.hgetall(keys.batch(e.pipeline_id, e.batch_id))
            hashes: list[dict[str, str]] = await pipe.execute()
        steps: dict[str, list[Event]] = {}
        for stop, packed in zip(stops, hashes, strict=True):
            fields = unpacked(packed)
            ended: dict[str, tuple[str, str, float]] = {}
            if stop.flow_run_id:
                try:
                    ended = await self.prefect.step_ends(stop.flow_run_id)
                except Exception as exc:  # the round's other repairs must not wait on it
                    log.warning("reconciler: task runs of %s unread (%s); running steps get "
                                "the usual guess", stop.flow_run_id, describe(exc))
            mine = steps[stop.event_id] = []
            still_running = running_steps(fields)
            for step, (state, state_id, entered) in sorted(ended.items()):
                held = fields.get(STEP_PREFIX + step)
                if held is not None and STEP_RANK[held] < STEP_RANK["success"]:
                    mine.append(Event(type="step.state", batch_id=stop.batch_id,
                                      pipeline_id=stop.pipeline_id, step=step, state=state,
                                      event_id=derived_id("task-", state_id),
                                      ts=state_time(entered)))
                    still_running.discard(step)
            if stop.outcome != "completed":
                mine += [Event(type="step.state", batch_id=stop.batch_id,
                               pipeline_id=stop.pipeline_id,
                               event_id=derived_id(stop.event_id + "-", step), step=step,
                               state="failed", ts=0.0)  # a guess: any real end beats it
                         for step in sorted(still_running)]
        out: list[Event] = []
        for e in events:
            out += steps.get(e.event_id, [])
            out.append(e)
        return out

    async def _crash_zombies(self, runs: dict[str, RunState]) -> None:
        """A run Prefect still calls running whose engine stopped sending heartbeats (its
        machine or worker died with it, so nobody reported the crash), or one a worker
        claimed and never started, is set Crashed in `runs` and in Prefect, which announces
        it like any crash."""
        assert self.prefect is not None
        now = datetime.now(UTC)
        claimed = self.options.pending_after_s
        if claimed > 0:
            for run in list(runs.values()):
                if (run.state_type == "PENDING" and run.since is not None
                        and run.since < now - timedelta(seconds=claimed)):
                    log.warning("reconciler: flow run %s claimed by a worker %.0fs ago and "
                                "never started; crashed", run.flow_run_id, claimed)
                    runs[run.flow_run_id] = await self.prefect.crash(
                        run, f"a worker claimed the flow run and did not start it within "
                             f"{claimed:.0f}s (the worker stopped?)")
        window = self.options.zombie_after_s
        if window <= 0:
            return
        since = now - timedelta(seconds=window)
        suspects = [r.flow_run_id for r in runs.values()
                    if r.state_type in ("RUNNING", "CANCELLING")
                    and r.since is not None and r.since < since]
        alive = await self.prefect.with_heartbeat(suspects, since)
        for flow_run_id in suspects:
            if flow_run_id not in alive:
                log.warning("reconciler: flow run %s sent no heartbeat for %.0fs; crashed",
                            flow_run_id, window)
                runs[flow_run_id] = await self.prefect.crash(
                    runs[flow_run_id], f"no heartbeat from the flow run for {window:.0f}s")
