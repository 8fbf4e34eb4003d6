"""The orphan sweep on the real Prefect and Redis: flow runs whose batch is gone, hidden or
stopped are cancelled (and deleted unless the batch still shows them); live runs, runs of a
batch being created right now and runs of another deployment's pipelines are not touched."""

from __future__ import annotations

from prefect.states import Running
from redis.asyncio import Redis

from consumers.plumbing.orphans import OrphanOptions, OrphanSweep
from consumers.plumbing.prefect_api import PrefectGateway
from consumers.reconciler import Reconciler
from core import keys
from core.codec import Event
from core.models import new_batch_id
from core.settings import Settings
from tests.conftest import eventually
from tests.test_consumers_support import make_spec, options, running, store_for, unique
from tests.test_reconciler_support import IdlePool, idle_pool


async def _orphans(pool: IdlePool, in_flight: str) -> dict[str, str]:
    """One run of each kind, by name -> flow run id."""
    store = store_for(pool.redis, pool.settings)
    runs: dict[str, str] = {}
    _, runs["live"] = (await pool.many(1))[0]
    runs["gone"] = await pool.run(new_batch_id())
    running_gone = new_batch_id()
    runs["running-gone"] = await pool.run(running_gone)
    await pool.client.set_flow_run_state(runs["running-gone"], Running(), force=True)
    hidden, runs["hidden"] = (await pool.many(1))[0]
    assert await store.hide(pool.pipeline_id, hidden)
    stopped, runs["stopped"] = (await pool.many(1))[0]
    await store.apply([Event(type="batch.state", batch_id=stopped, pipeline_id=pool.pipeline_id,
                             state="stop", outcome="failed", reason="gave up")])
    # A POST in flight: the run exists, its batch does not yet.
    runs["in-flight"] = await pool.run(in_flight)
    # A run of a pipeline this Redis never registered: another deployment's.
    runs["foreign"] = await pool.run(new_batch_id(), pipeline_id=unique("elsewhere"))
    return runs


async def test_orphans_of_each_kind_are_cancelled_or_deleted(redis: Redis,
                                                             test_settings: Settings) -> None:
    async with idle_pool(test_settings, redis) as pool:
        in_flight = new_batch_id()
        runs = await _orphans(pool, in_flight)
        gateway = PrefectGateway(test_settings, 10.0)
        await gateway.open()
        try:
            # Within the grace period nothing is judged, however orphaned it looks.
            patient = OrphanSweep(redis, gateway, OrphanOptions(grace_s=3600), scope=pool.scope)
            report = await patient.sweep()
            assert (report.examined, report.cancelled, report.complete) == (len(runs), [], True)
            # The POST completes: its batch exists and its run is live.
            await store_for(redis, test_settings).create(
                pool.pipeline_id, in_flight, make_spec(pool.pipeline_id))
            # Past it, each round acts on at most `actions` runs.
            sweep = OrphanSweep(redis, gateway, OrphanOptions(grace_s=0, actions=2,
                                                              cancel_wait_s=0), scope=pool.scope)
            first = await sweep.sweep()
            assert len(first.cancelled) == 2

            expected = {"live": "SCHEDULED", "in-flight": "SCHEDULED", "foreign": "SCHEDULED",
                        "gone": None, "running-gone": None, "hidden": None,
                        "stopped": "CANCELLED"}
            states: dict[str, str | None] = {}

            async def settled() -> bool:
                await sweep.sweep()
                states.update({name: await pool.state_of(run) for name, run in runs.items()})
                return states == expected
            await eventually(settled, timeout=30, interval=0.2)
        finally:
            await gateway.close()
        assert states == expected


async def test_the_reconciler_sweeps_every_round(topics: Settings, redis: Redis) -> None:
    async with idle_pool(topics, redis) as pool:
        live, live_run = (await pool.many(1))[0]
        await redis.delete(keys.batch(pool.pipeline_id, live))  # purged behind our back
        reconciler = Reconciler(topics, options(reconcile_interval_s=0.2),
                                orphans=OrphanOptions(grace_s=0), orphan_scope=pool.scope)
        async with running(reconciler):
            async def deleted() -> bool:
                return await pool.state_of(live_run) is None
            await eventually(deleted, timeout=20, interval=0.2)
