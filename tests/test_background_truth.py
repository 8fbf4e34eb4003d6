"""The background machinery telling the truth under stale reads and races: the reconciler's
zombie verdict never forced over a run that ended meanwhile, and a published batch removed by
retention never brought back by its run published again (found by review, each failing
before its fix)."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

from prefect.states import Completed, Running
from redis.asyncio import Redis

from consumers.plumbing.creation import Creations
from consumers.retention import RetentionSweeper
from core import keys
from core.codec import Event, Run, decode_command
from core.registry import PipelineRegistry
from core.scripts import Scripts
from core.settings import Settings
from core.store import BatchStore
from tests.helpers import swept_at
from tests.test_commands_published import command, spec
from tests.test_consumers_support import unique
from tests.test_reconciler_support import idle_pool, reconciler_without_sweep

DAY_S = 86_400


async def test_a_zombie_verdict_read_before_the_run_completed_does_not_crash_it(
        topics: Settings, redis: Redis) -> None:
    """The reconciler reads a run Running, finds no heartbeat, and forces Crashed. The run
    completed in between (its engine was alive after all, only its heartbeats had not
    reached Prefect): the forced Crashed overwrites Prefect's Completed, and the batch whose
    every step succeeded ends `crashed`."""
    async with idle_pool(topics, redis) as pool:
        batch_id = await pool.batch()
        flow_run_id = await pool.scheduled(batch_id)
        await pool.client.set_flow_run_state(flow_run_id, Running(), force=True)
        await asyncio.sleep(1.2)  # the run has been Running (with no heartbeat) past the window

        async with reconciler_without_sweep(topics, zombie_after_s=1.0) as reconciler:
            assert reconciler.prefect is not None
            gateway = reconciler.prefect
            read_heartbeats = gateway.with_heartbeat

            async def completes_meanwhile(ids: list[str], since: datetime) -> set[str]:
                alive = await read_heartbeats(ids, since)
                # The engine's own end, proposed as the engine proposes it (not forced).
                result: Any = await pool.client.set_flow_run_state(flow_run_id, Completed())
                assert result.state is not None and result.state.type.value == "COMPLETED"
                return alive

            gateway.with_heartbeat = completes_meanwhile  # type: ignore[method-assign,assignment]
            events = await reconciler.reconcile()
        crashed = [e for e in events if e.batch_id == batch_id and e.outcome == "crashed"]
        assert await pool.state_of(flow_run_id) == "COMPLETED", (
            "a run that completed after the reconciler's read was forced Crashed over it")
        assert not crashed, f"published {crashed}"


async def published_and_stopped(settings: Settings, redis: Redis
                                ) -> tuple[Creations, Run, str, str]:
    """A batch its publisher created with a `run` command carrying `create` (the claim as the
    commands consumer writes it), run and stopped."""
    pipeline_id = unique("test-r8c")
    registry = PipelineRegistry(redis, Scripts(redis))
    await registry.register(pipeline_id, spec(pipeline_id, "1"))
    store = BatchStore.from_settings(redis, settings)
    creations = Creations(redis, store, registry, retention_days=settings.batch_retention_days)
    batch_id = unique("batch-pub")
    run = decode_command(command("run", pipeline_id, batch_id, create={}))
    assert isinstance(run, Run)
    assert await creations.ensure(run)
    await store.apply([Event("batch.state", batch_id, pipeline_id, event_id="end",
                             state="stop", outcome="completed")])
    assert await redis.hget(keys.batch(pipeline_id, batch_id), "state") == "stop"
    return creations, run, pipeline_id, batch_id


async def test_with_the_default_retention_a_republished_run_does_not_bring_a_removed_batch_back(
        topics: Settings, redis: Redis) -> None:
    """README: "after a delete, or its removal by the retention sweeper, the id stays deleted
    (its claim is kept 30 days)"; retention.py marks the claim deleted so that "a publisher's
    run sent again must not bring it back as new". But the claim's 30 days run from the
    batch's creation (`SET ... EX RECORD_TTL_S` in `Creations.ensure`), and the default
    retention removes a batch 30 days (+ up to an hour) after its *stop*: by then the claim
    has always expired, `mark_deleted` finds none, and the publisher's retry creates the
    batch again, pending, and its run runs the finished work a second time. (The test of the
    fix in test_commands_published.py passes only because it moves the sweeper's clock 31
    days while Redis's TTL stays in real time.)"""
    settings = topics.model_copy(update={"batch_retention_days": 30})  # the default
    creations, run, pipeline_id, batch_id = await published_and_stopped(settings, redis)
    claim = keys.published(batch_id)
    now = time.time()
    removed_at = 30 * DAY_S + 3_600  # when the sweeper removes it (its stop hour's end + 30 d)
    left_s = await redis.ttl(claim)
    if left_s < removed_at:
        await redis.delete(claim)  # what Redis has done by then, on its own
    assert await swept_at(settings, lambda: now + removed_at) == 1
    assert not await redis.exists(keys.batch(pipeline_id, batch_id))
    # Its publisher sends the run again (a retry, a replay of its outbox).
    again = await creations.ensure(run)
    state = await redis.hget(keys.batch(pipeline_id, batch_id), "state")
    assert (again, state) == (False, None), (
        f"the claim lasted {left_s} s, the batch was removed {removed_at} s later: the run "
        f"published again created it anew ({state!r}) and goes on to run it")


async def test_a_run_republished_while_retention_removes_its_batch_does_not_run_it_again(
        topics: Settings, redis: Redis) -> None:
    """The claim still there (a retention of 7 days): the publisher's run arrives while the
    sweeper removes the batch. `Creations.ensure` read the claim (not deleted yet), the
    sweeper then marked it deleted and purged the batch, and `_claimed` found no hash: taken
    for "claimed, then the process stopped before the batch was created", it creates the
    batch again, pending, and the run goes on. A batch finished a week ago runs its work a
    second time (and shows as new). The delete path cannot race so (a delete command and the
    run of one id are on one partition, in order); the sweeper runs beside the commands."""
    settings = topics.model_copy(update={"batch_retention_days": 7})
    creations, run, pipeline_id, batch_id = await published_and_stopped(settings, redis)
    now = time.time()
    sweeper = RetentionSweeper(settings, clock=lambda: now + 7 * DAY_S + 3_600)
    await sweeper.start()
    swept: list[int] = []
    check = creations._check

    async def check_then_sweep(command: Run, claim: Any) -> None:
        await check(command, claim)
        if not swept:  # the sweeper's round lands between the claim's read and the hash's
            swept.append(await sweeper.sweep_once())

    creations._check = check_then_sweep  # type: ignore[method-assign]
    try:
        again = await creations.ensure(run)
    finally:
        await sweeper.stop()
    assert swept == [1]
    state = await redis.hget(keys.batch(pipeline_id, batch_id), "state")
    assert (again, state) == (False, None), (
        f"removed by retention, the batch was created again ({state!r}) and its run goes on")
