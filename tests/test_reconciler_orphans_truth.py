"""The orphan sweep and a batch already `stop`: the runs it must leave alone.

- A failed batch's flow run retried in Prefect (its UI's "Retry": supported, see
  tests/test_scripts.py) was cancelled by the sweep as an orphan of a stopped batch; the
  batch then ended `cancelled` with the sweep's reason instead of the retry's real end.
- A run stuck in Cancelling was forced Cancelled for every verdict, a stopped batch's
  included: a given-up batch (`failed`, its reason) then read `cancelled`, "orphan flow run:
  batch stopped", once the bridge brought that Cancelled in. Nobody had stopped it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from prefect.states import AwaitingRetry, Cancelling, Failed, Pending, Running
from redis.asyncio import Redis

from consumers.plumbing.active import ActiveRuns
from consumers.plumbing.cleanup import MESSAGES, Cleanup
from consumers.plumbing.orphans import OrphanOptions, OrphanSweep
from consumers.plumbing.prefect_api import PrefectGateway
from core.codec import Event, derived_id
from core.prefect_events import flow_state_event
from core.settings import Settings
from tests.test_consumers_support import options, store_for
from tests.test_reconciler_support import idle_pool

GAVE_UP = "prefect unavailable: retries exhausted"


async def test_a_failed_batchs_run_retried_in_prefect_is_not_cancelled_by_the_sweep(
        redis: Redis, test_settings: Settings) -> None:
    async with idle_pool(test_settings, redis) as pool:
        store = store_for(redis, test_settings)
        batch_id, run_id = (await pool.many(1))[0]
        # The run ran and failed; its end reached the batch (bridge / hook).
        await pool.client.set_flow_run_state(run_id, Running(), force=True)
        failed: Any = (await pool.client.set_flow_run_state(
            run_id, Failed(message="step transform failed"), force=True)).state
        assert failed is not None
        ended = flow_state_event(
            pipeline_id=pool.pipeline_id, batch_id=batch_id, flow_run_id=run_id,
            state_type="FAILED", state_id=str(failed.id), message=failed.message,
            ts=failed.timestamp.timestamp())
        assert ended is not None
        await store.apply([ended])
        assert (await store.get(pool.pipeline_id, batch_id) or {})["outcome"] == "failed"
        # Later, a user retries the failed run in Prefect's UI ("Retry"); a worker takes it
        # and its engine starts it again, as tests/test_scripts.py expects it may.
        await pool.client.set_flow_run_state(run_id, AwaitingRetry(), force=True)
        steps: list[tuple[Any, str]] = [(Pending(), "PENDING"), (Running(), "RUNNING")]
        for state, name in steps:
            entered: Any = (await pool.client.set_flow_run_state(run_id, state)).state
            assert entered is not None and entered.type.value == name

        gateway = _HistoryReads(test_settings, 10.0)
        await gateway.open()
        try:
            # grace_s=0 stands for "the retry came more than grace_s (120 s) after the
            # failure": the run was created long before, the batch last changed at the
            # failure (the retry's `running` and its steps' `running` rank below what the
            # batch holds, so they change nothing).
            sweep = OrphanSweep(redis, gateway, OrphanOptions(grace_s=0), scope=pool.scope)
            reports = [await sweep.sweep() for _ in range(3)]
        finally:
            await gateway.close()
        after = await pool.client.read_flow_run(UUID(run_id))
        assert after.state is not None
        assert [r.cancelled for r in reports] == [[], [], []], (
            f"the sweep cancelled the retried run: {after.state.type.value} "
            f"({after.state.message!r})")
        assert after.state.type.value == "RUNNING"
        # Ended once is for good: its state history is read on the first round alone.
        assert [r.complete for r in reports] == [True, True, True]
        assert gateway.history_reads == 1


class _HistoryReads(PrefectGateway):
    history_reads = 0

    async def ended_once(self, flow_run_id: str) -> bool:
        self.history_reads += 1
        return await super().ended_once(flow_run_id)


async def test_a_given_up_batchs_stuck_run_keeps_the_batchs_outcome(
        redis: Redis, test_settings: Settings) -> None:
    async with idle_pool(test_settings, redis) as pool:
        store = store_for(redis, test_settings)
        batch_id, run_id = (await pool.many(1))[0]
        await pool.client.set_flow_run_state(run_id, Running(), force=True)
        # commands._reject: stop/failed as of the command's time, then the clean-up's
        # 'cancel' job proposes Cancelling and is done ("its worker ends it").
        await store.apply([Event(
            type="batch.state", batch_id=batch_id, pipeline_id=pool.pipeline_id,
            event_id=derived_id("fail-", "cmd-1"), state="stop", outcome="failed",
            reason=GAVE_UP, ts=1.0)])
        await pool.client.set_flow_run_state(run_id, Cancelling(message=MESSAGES["cancel"]))
        before = await store.get(pool.pipeline_id, batch_id)
        assert before is not None
        assert (before["outcome"], before.get("reason")) == ("failed", GAVE_UP)

        gateway = PrefectGateway(test_settings, 10.0)
        await gateway.open()
        try:
            # grace/cancel_wait 0: the run was created, the batch changed and the run entered
            # Cancelling long enough ago (the defaults: 120 s, 30 s).
            sweep = OrphanSweep(redis, gateway, OrphanOptions(grace_s=0, cancel_wait_s=0),
                                scope=pool.scope)
            await sweep.sweep()
        finally:
            await gateway.close()
        run = await pool.client.read_flow_run(UUID(run_id))
        assert run.state is not None
        # What the bridge then applies for the run's new state (pf-<state id>).
        event = flow_state_event(
            pipeline_id=pool.pipeline_id, batch_id=batch_id, flow_run_id=run_id,
            state_type=run.state.type.value, state_id=str(run.state.id),
            message=run.state.message, ts=run.state.timestamp.timestamp())
        if event is not None:
            await store.apply([event])
        after = await store.get(pool.pipeline_id, batch_id)
        assert after is not None
        assert (after["outcome"], after.get("reason")) == ("failed", GAVE_UP)


class _Applying:
    """An emitter whose events the store applies at once (as the events consumer would)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.sent: list[Event] = []

    async def emit(self, events: Sequence[Event]) -> None:
        self.sent += events
        await self.store.apply(list(events))


async def test_a_given_up_batchs_run_is_left_to_its_queued_clean_up(
        redis: Redis, test_settings: Settings) -> None:
    """The give-up's `cancel` job says the failure again only over the runs it cancelled
    itself. When the sweep got to the run first (the job lagging past the sweep's grace, as
    in the Prefect brown-out that gives commands up), its Cancelled became the batch's
    latest stop, unknown to the job: the batch read `cancelled`. A stopped batch whose
    clean-up is queued is the job's."""
    async with idle_pool(test_settings, redis) as pool:
        store = store_for(redis, test_settings)
        batch_id, run_id = (await pool.many(1))[0]
        # commands._reject: stop/failed as of the command's time, the `cancel` job queued.
        await store.apply([Event(
            type="batch.state", batch_id=batch_id, pipeline_id=pool.pipeline_id,
            event_id=derived_id("fail-", "cmd-1"), state="stop", outcome="failed",
            reason=GAVE_UP, ts=time.time())])
        emitter = _Applying(store)
        gateway = PrefectGateway(test_settings, 10.0)
        await gateway.open()
        try:
            cleanup = Cleanup(redis, gateway, store, ActiveRuns(redis),
                              options(cleanup_recheck_s=0.0), asyncio.Event(),
                              emitter=emitter)  # type: ignore[arg-type]
            await cleanup.enqueue("cancel", pool.pipeline_id, batch_id)
            # grace_s=0 stands for "the job lagged past the sweep's 120 s grace".
            sweep = OrphanSweep(redis, gateway, OrphanOptions(grace_s=0), scope=pool.scope)
            assert (await sweep.sweep()).cancelled == []
            since = time.time()
            for _ in range(3):
                if await cleanup.one_pass("cancel", pool.pipeline_id, batch_id, since) is None:
                    break
            run = await pool.client.read_flow_run(UUID(run_id))
            assert run.state is not None and run.state.type.value == "CANCELLED"
            # What the bridge then applies for it: older than the failure said again.
            event = flow_state_event(
                pipeline_id=pool.pipeline_id, batch_id=batch_id, flow_run_id=run_id,
                state_type=run.state.type.value, state_id=str(run.state.id),
                message=run.state.message, ts=run.state.timestamp.timestamp())
            assert event is not None
            await store.apply([event])
        finally:
            await gateway.close()
        after = await store.fields(pool.pipeline_id, batch_id)
    assert after is not None and (after["state"], after["outcome"]) == ("stop", "failed")
