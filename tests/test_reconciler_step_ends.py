"""The reconciler's repair of a run whose events were lost also brings its steps' ends, on
the real stack (a real run on the worker): the bridge forwards the run until `transform`
runs, then stays down past Prefect's backfill window (here: for good) while the run
completes. The reconciler published the run's Completed and nothing more: the batch stayed
`stop`/`completed` with `transform` `running` and `load` `none`, for ever."""

from __future__ import annotations

import uuid
from pathlib import Path

from redis.asyncio import Redis

from consumers.bridge import PrefectBridge
from consumers.reconciler import Reconciler
from core.settings import Settings
from tests.conftest import eventually
from tests.test_consumers_bridge import make_ctx
from tests.test_consumers_support import options, prefect, running, send_command

STEPS = ("extract", "transform", "load")


async def test_a_completed_run_repaired_by_the_reconciler_leaves_no_running_step(
        topics: Settings, redis: Redis, tmp_path: Path) -> None:
    ctx = make_ctx(topics, redis, tmp_path, sleep=2.0)
    try:
        batch_id = await ctx.batch()
        async with ctx.loop(bridge=False):
            async with running(PrefectBridge(ctx.settings, options())):
                await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)

                async def transform_running() -> bool:
                    return (await ctx.fields(batch_id)).get("step:transform") == "running"
                await eventually(transform_running, timeout=120, interval=0.1)
            flow_run_id = uuid.UUID((await ctx.fields(batch_id))["flow_run_id"])
            async with prefect(ctx.settings) as client:
                async def completed_in_prefect() -> bool:
                    run = await client.read_flow_run(flow_run_id)
                    return run.state is not None and run.state.type.value == "COMPLETED"
                await eventually(completed_in_prefect, timeout=60, interval=0.5)
            async with running(Reconciler(ctx.settings, options(reconcile_interval_s=0.2))):
                fields = await ctx.reaches(batch_id, "stop", timeout=30)
        assert fields["outcome"] == "completed"
        # The step events go before the stop, in the same publish: applied with it.
        assert {s: fields[f"step:{s}"] for s in STEPS} == dict.fromkeys(STEPS, "success")
    finally:
        await ctx.deployer.cleanup(ctx.batches)
