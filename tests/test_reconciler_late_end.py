"""The reconciler dropped a batch from its active index as soon as Redis said `stop`, but a
stopped batch's outcome can still change: Prefect lets a Cancelled run go Running, then
Completed (the clean-up forces Cancelled on a run a stop found unstarted, and its engine may
still start it: options.stop_unstarted_wait_s says the later Completed decides the batch's
outcome too). With that Completed's events lost (hook's publish lost, bridge down past
Prefect's backfill), nothing repaired it: GET said cancelled for a run Prefect held
Completed. A stopped batch now leaves the index once its run is final no later than its
stop, and a later end is published."""

from __future__ import annotations

from typing import Any

from prefect.states import Cancelled, Completed, Running
from redis.asyncio import Redis

from consumers.plumbing.active import ActiveRuns, member
from core.prefect_events import flow_state_event
from core.settings import Settings
from tests.test_consumers_support import store_for
from tests.test_reconciler_support import idle_pool, reconciler_without_sweep


async def test_a_stopped_batchs_later_completion_is_repaired(topics: Settings,
                                                            redis: Redis) -> None:
    async with idle_pool(topics, redis) as pool:
        store = store_for(redis, topics)
        (batch_id, run_id), (done_id, done_run) = await pool.many(2)
        for batch, run in ((batch_id, run_id), (done_id, done_run)):
            # The clean-up of a stop forced Cancelled on the unstarted run; the batch says so.
            cancelled: Any = (await pool.client.set_flow_run_state(
                run, Cancelled(message="stopped through the batches API"), force=True)).state
            event = flow_state_event(
                pipeline_id=pool.pipeline_id, batch_id=batch, flow_run_id=run,
                state_type="CANCELLED", state_id=str(cancelled.id), message=cancelled.message,
                ts=cancelled.timestamp.timestamp())
            assert event is not None
            await store.apply([event])
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
