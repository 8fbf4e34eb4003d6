"""The reconciler takes a CANCELLING run with no heartbeat for a zombie (its suspects include
CANCELLING) and proposes Crashed - which Prefect always rejects from Cancelling
(core_policy.EnforceCancellingToCancelledTransition: only Cancelled may follow). The
gateway returns the run still Cancelling, no event is published, and the batch reads
`running` for ever though its engine is dead (a run cancelled outside a stop command, from
Prefect's UI, whose machine died: no clean-up job ever forces it)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from prefect.states import Cancelling, Running
from redis.asyncio import Redis

from core.codec import Event
from core.settings import Settings
from tests.test_consumers_support import store_for
from tests.test_reconciler_support import idle_pool, reconciler_without_sweep


async def test_a_cancelling_zombie_is_ended(topics: Settings, redis: Redis) -> None:
    async with idle_pool(topics, redis) as pool:
        store = store_for(redis, topics)
        batch_id, run_id = (await pool.many(1))[0]
        await pool.client.set_flow_run_state(run_id, Running(), force=True)
        await store.apply([Event(type="batch.state", batch_id=batch_id,
                                 pipeline_id=pool.pipeline_id, event_id="ev-running",
                                 state="running", flow_run_id=run_id)])
        entered: Any = (await pool.client.set_flow_run_state(
            run_id, Cancelling(message="cancelled from the Prefect UI"))).state
        assert entered is not None and entered.type.value == "CANCELLING"
        window = 1.0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        # Until the Cancelling state is older than the zombie window (Prefect's clock).
        while (datetime.now(UTC) - entered.timestamp).total_seconds() <= window + 0.2:
            assert loop.time() < deadline
            await asyncio.sleep(0.05)
        async with reconciler_without_sweep(topics, zombie_after_s=window,
                                            reconcile_interval_s=3600) as reconciler:
            events = await reconciler.reconcile()
        run = await pool.client.read_flow_run(UUID(run_id))
        assert run.state is not None
        assert run.state.type.value == "CANCELLED", "the zombie stays Cancelling for good"
        assert [(e.state, e.outcome) for e in events if e.type == "batch.state"] == [
            ("stop", "cancelled")]
