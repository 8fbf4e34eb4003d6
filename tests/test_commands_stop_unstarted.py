"""A stop that left a never-started run Cancelling, with no worker to end it (the worker that
claimed it died): the stop's follow-up ends it Cancelled after `stop_unstarted_wait_s`, so the
batch reaches `stop` instead of waiting forever. Real Prefect (a work pool without a worker)."""

from __future__ import annotations

import asyncio
import time
from uuid import UUID

from prefect.states import Cancelling, Pending
from redis.asyncio import Redis

from consumers.plumbing.active import ActiveRuns
from consumers.plumbing.cleanup import Cleanup
from consumers.plumbing.prefect_api import PrefectGateway
from core.settings import Settings
from tests.conftest import eventually
from tests.test_consumers_support import options, store_for
from tests.test_reconciler_support import idle_pool


async def test_a_never_started_run_left_cancelling_is_ended_after_the_wait(
        topics: Settings, redis: Redis) -> None:
    async with idle_pool(topics, redis) as pool:
        batch_id = await pool.batch()
        flow_run_id = await pool.scheduled(batch_id)
        # A worker claimed it, then the stop proposed Cancelling, then the worker died.
        await pool.client.set_flow_run_state(UUID(flow_run_id), Pending(), force=True)
        await pool.client.set_flow_run_state(UUID(flow_run_id), Cancelling(), force=True)

        # A wait of a few seconds: the first pass (a Prefect read) must land within it even
        # on a busy machine (`make test` runs two files at once; 2 s, then 6 s in a CI run
        # of a slow day, were exceeded).
        opts = options(stop_unstarted_wait_s=15.0, stop_cancelling_wait_s=30.0)
        gateway = PrefectGateway(topics, opts.prefect_timeout_s)
        await gateway.open()
        try:
            cleanup = Cleanup(redis, gateway, store_for(redis, topics), ActiveRuns(redis),
                              opts, asyncio.Event())
            since = time.time()
            # Within the wait it is left to the worker that would end it.
            assert await cleanup.one_pass("stop", pool.pipeline_id, batch_id, since) is not None
            assert await pool.state_of(flow_run_id) == "CANCELLING"

            async def ended() -> bool:
                await cleanup.one_pass("stop", pool.pipeline_id, batch_id, since)
                return await pool.state_of(flow_run_id) == "CANCELLED"

            await eventually(ended, timeout=30, interval=0.5)
        finally:
            await gateway.close()
