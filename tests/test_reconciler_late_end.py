"""The reconciler dropped a batch from its active index as soon as Redis said `stop`, but a
stopped batch's outcome can still change: Prefect lets a Cancelled run go Running, then
Completed (the clean-up forces Cancelled on a run a stop found unstarted, and its engine may
still start it: options.stop_unstarted_wait_s says the later Completed decides the batch's
outcome too). With that Completed's events lost (hook's publish lost, bridge down past
Prefect's backfill), nothing repaired it: GET said cancelled for a run Prefect held
Completed. A stopped batch now leaves the index once its run is final no later than its
stop, and a later end is published: only once that publish went through (a round whose
publish failed had dropped the batch already), and with the repair of its steps that every
end the reconciler publishes gets (a step left `running` in a failed batch)."""

from __future__ import annotations

import contextlib
from typing import Any

from aiokafka.errors import KafkaConnectionError
from prefect.states import Cancelled, Completed, Failed, Running
from redis.asyncio import Redis

from consumers.plumbing.active import ActiveRuns, member
from core.codec import Event
from core.prefect_events import flow_state_event
from core.settings import Settings
from tests.test_consumers_support import store_for
from tests.test_reconciler_support import IdlePool, idle_pool, reconciler_without_sweep


async def _stopped_by_a_cancel(pool: IdlePool, store: Any, batch_id: str, run_id: str) -> None:
    """The clean-up of a stop forced Cancelled on the unstarted run; the batch says so."""
    cancelled: Any = (await pool.client.set_flow_run_state(
        run_id, Cancelled(message="stopped through the batches API"), force=True)).state
    event = flow_state_event(
        pipeline_id=pool.pipeline_id, batch_id=batch_id, flow_run_id=run_id,
        state_type="CANCELLED", state_id=str(cancelled.id), message=cancelled.message,
        ts=cancelled.timestamp.timestamp())
    assert event is not None
    await store.apply([event])


async def test_a_stopped_batchs_later_completion_is_repaired(topics: Settings,
                                                            redis: Redis) -> None:
    async with idle_pool(topics, redis) as pool:
        store = store_for(redis, topics)
        (batch_id, run_id), (done_id, done_run) = await pool.many(2)
        for batch, run in ((batch_id, run_id), (done_id, done_run)):
            await _stopped_by_a_cancel(pool, store, batch, run)
        # One run's engine started it after all and it completed (Prefect takes both
        # proposals); the events of that end were lost.
        steps: list[tuple[Any, str]] = [(Running(), "RUNNING"), (Completed(), "COMPLETED")]
        for state, name in steps:
            entered: Any = (await pool.client.set_flow_run_state(run_id, state)).state
            assert entered.type.value == name
        async with reconciler_without_sweep(topics, zombie_after_s=0,
                                            reconcile_interval_s=3600) as reconciler:
            events = [e for _ in range(2) for e in await reconciler.reconcile()]
        assert [(e.batch_id, e.state, e.outcome) for e in events
                if e.type == "batch.state"] == [(batch_id, "stop", "completed")]
        # Both are done with: the one whose Cancelled is its stop, and the repaired one.
        indexed = await redis.zrange(ActiveRuns(redis).key, 0, -1)
        assert not {member(pool.pipeline_id, b) for b in (batch_id, done_id)} & set(indexed)


async def test_a_late_end_survives_a_failed_publish(topics: Settings, redis: Redis) -> None:
    async with idle_pool(topics, redis) as pool:
        store = store_for(redis, topics)
        [(batch_id, run_id)] = await pool.many(1)
        await _stopped_by_a_cancel(pool, store, batch_id, run_id)
        ran: list[Any] = [Running(), Completed()]  # the engine ran it after all; events lost
        for state in ran:
            await pool.client.set_flow_run_state(run_id, state)
        async with reconciler_without_sweep(topics, zombie_after_s=0,
                                            reconcile_interval_s=3600) as reconciler:
            real = reconciler.emitter.publish
            calls = {"n": 0}

            async def flaky(events: Any) -> None:
                calls["n"] += 1
                if calls["n"] == 1:
                    raise KafkaConnectionError("broker unavailable for a moment")
                await real(events)
            reconciler.emitter.publish = flaky  # type: ignore[method-assign]
            with contextlib.suppress(KafkaConnectionError):  # the loop logs it and goes on
                await reconciler.reconcile()
            published = [e for _ in range(3) for e in await reconciler.reconcile()]
    assert [(e.batch_id, e.state, e.outcome) for e in published
            if e.type == "batch.state"] == [(batch_id, "stop", "completed")], (
        "the late Completed was never published once one round's publish failed")


async def _step_running(store: Any, pipeline_id: str, batch_id: str) -> None:
    await store.apply([Event(type="step.state", batch_id=batch_id, pipeline_id=pipeline_id,
                             step="extract", state="running", event_id=f"run-x-{batch_id}")])


async def test_a_late_failed_end_leaves_no_running_step(topics: Settings, redis: Redis) -> None:
    async with idle_pool(topics, redis) as pool:
        store = store_for(redis, topics)
        [(batch_id, run_id)] = await pool.many(1)
        await _stopped_by_a_cancel(pool, store, batch_id, run_id)
        # Its engine started it after all; `extract` started; then its events were lost.
        started: Any = (await pool.client.set_flow_run_state(run_id, Running())).state
        assert started.type.value == "RUNNING"
        await _step_running(store, pool.pipeline_id, batch_id)
        failed: Any = (await pool.client.set_flow_run_state(run_id, Failed())).state
        assert failed.type.value == "FAILED"
        async with reconciler_without_sweep(topics, zombie_after_s=0,
                                            reconcile_interval_s=3600) as reconciler:
            events = [e for _ in range(2) for e in await reconciler.reconcile()]
        await store.apply(events)
        fields = await store.fields(pool.pipeline_id, batch_id)
        assert fields is not None
    shown = (fields["state"], fields.get("outcome"), fields.get("step:extract"))
    assert shown == ("stop", "failed", "failed"), (
        f"after the reconciler's repair the batch reads {shown}; published "
        f"{[(e.type, e.state, e.step) for e in events]}")
