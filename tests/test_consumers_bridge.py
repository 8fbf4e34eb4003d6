"""The Prefect bridge and the reconciler, with real flow runs on the stack's worker.

The whole loop minus the API: a run command → the commands consumer creates the flow run →
the worker runs it → Prefect's events → the bridge → the events topic → the events
consumer → Redis.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.schemas.objects import State
from prefect.states import Crashed, Pending, Running
from redis.asyncio import Redis

from consumers.bridge import PrefectBridge
from consumers.commands import CommandsConsumer
from consumers.events import EventsConsumer
from consumers.reconciler import Reconciler
from core import keys
from core.codec import Event, decode_event
from core.settings import Settings
from tests.conftest import eventually
from tests.helpers import read_topic
from tests.test_consumers_support import (
    Deployer,
    PipelineCtx,
    options,
    prefect,
    running,
    send,
    send_command,
    unique,
)


class Ctx(PipelineCtx):
    async def reaches(self, batch_id: str, state: str, timeout: float = 60) -> dict[str, str]:
        async def check() -> dict[str, str] | None:
            fields = await self.fields(batch_id)
            return fields if fields.get("state") == state else None
        result: dict[str, str] = await eventually(check, timeout=timeout, interval=0.1)  # type: ignore[assignment]
        return result

    @contextlib.asynccontextmanager
    async def loop(self, bridge: bool = True) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(running(EventsConsumer(self.settings, options())))
            await stack.enter_async_context(running(CommandsConsumer(
                self.settings, options(), ensure=self.deployer.ensure)))
            if bridge:
                await stack.enter_async_context(running(PrefectBridge(self.settings, options())))
            yield


def make_ctx(settings: Settings, redis: Redis, flow_dir: Path | None,
             **parameters: Any) -> Ctx:
    return Ctx(settings, redis, Deployer(settings, flow_dir, parameters), unique("test-br"))


@pytest.fixture
async def ctx(topics: Settings, redis: Redis, tmp_path: Path) -> AsyncIterator[Ctx]:
    context = make_ctx(topics, redis, tmp_path)
    try:
        yield context
    finally:
        await context.deployer.cleanup(context.batches)


async def test_a_real_run_arrives_translated_and_completes_the_batch(ctx: Ctx) -> None:
    batch_id = await ctx.batch()
    async with ctx.loop():
        await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
        fields = await ctx.reaches(batch_id, "stop")
        assert fields["outcome"] == "completed"

        async def steps_done() -> bool:
            f = await ctx.fields(batch_id)
            return all(f[f"step:{s}"] == "success" for s in ("extract", "transform", "load"))
        await eventually(steps_done, timeout=15)
    records = await read_topic(
        ctx.settings, ctx.settings.topic_events,
        lambda rs: sum(1 for r in rs if r.key == batch_id.encode()) >= 8)
    mine = [decode_event(r.value) for r in records if r.key == batch_id.encode()]
    bridged = [e for e in mine if e.event_id.startswith("pf-")]
    assert {e.state for e in bridged if e.type == "batch.state"} >= {
        "scheduled", "running", "stop"}
    assert {(e.step, e.state) for e in bridged if e.type == "step.state"} >= {
        ("extract", "running"), ("extract", "success"), ("load", "success")}
    assert {e.flow_run_id for e in bridged if e.type == "batch.state"} == {fields["flow_run_id"]}


async def test_a_failing_step_fails_the_batch(topics: Settings, redis: Redis,
                                              tmp_path: Path) -> None:
    ctx = make_ctx(topics, redis, tmp_path, fail="transform")
    try:
        batch_id = await ctx.batch()
        async with ctx.loop():
            await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
            await ctx.reaches(batch_id, "stop")

            async def transform_failed() -> bool:
                return (await ctx.fields(batch_id))["step:transform"] == "failed"
            await eventually(transform_failed, timeout=15)
        fields = await ctx.fields(batch_id)
        assert fields["outcome"] == "failed"
        assert "transform failed on purpose" in fields["reason"]
        assert fields["step:extract"] == "success"
        assert fields["step:load"] == "none"
    finally:
        await ctx.deployer.cleanup(ctx.batches)


async def test_stop_while_running_ends_cancelled(topics: Settings, redis: Redis,
                                                 tmp_path: Path) -> None:
    ctx = make_ctx(topics, redis, tmp_path, sleep=20.0)
    try:
        batch_id = await ctx.batch()
        async with ctx.loop():
            await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
            await ctx.reaches(batch_id, "running")
            await send_command(ctx.settings, "stop", ctx.pipeline_id, batch_id)
            fields = await ctx.reaches(batch_id, "stop", timeout=20)
        assert fields["outcome"] == "cancelled"
        async with prefect(ctx.settings) as client:
            run = await client.read_flow_run(uuid.UUID(fields["flow_run_id"]))
        assert run.state is not None and run.state.type.value == "CANCELLED"
    finally:
        await ctx.deployer.cleanup(ctx.batches)


async def test_events_while_the_bridge_was_down_are_replayed(ctx: Ctx) -> None:
    warmup = await ctx.batch()
    batch_id = await ctx.batch()
    async with ctx.loop(bridge=False):
        # A first bridge forwards one run and leaves its checkpoint...
        async with running(PrefectBridge(ctx.settings, options())):
            await send_command(ctx.settings, "run", ctx.pipeline_id, warmup)
            await ctx.reaches(warmup, "stop")
        assert await ctx.redis.get(keys.BRIDGE_CHECKPOINT)
        # ...a run goes from start to end while no bridge runs...
        await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
        async with prefect(ctx.settings) as client:
            async def finished() -> bool:
                fields = await ctx.fields(batch_id)
                if "flow_run_id" not in fields:
                    return False
                run = await client.read_flow_run(uuid.UUID(fields["flow_run_id"]))
                return run.state is not None and run.state.is_final()
            await eventually(finished, timeout=60, interval=0.2)
        assert (await ctx.fields(batch_id))["state"] == "scheduled"
        # ...and the next bridge replays it from the checkpoint.
        async with running(PrefectBridge(ctx.settings, options())):
            fields = await ctx.reaches(batch_id, "stop", timeout=30)
    assert fields["outcome"] == "completed"


async def test_reconciler_publishes_a_final_state_nobody_reported(topics: Settings,
                                                                   redis: Redis) -> None:
    ctx = make_ctx(topics, redis, None)  # idle pool: the runs stay Scheduled
    try:
        crashed, vanished = await ctx.batch(), await ctx.batch()
        async with ctx.loop(bridge=False):
            for batch_id in (crashed, vanished):
                await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
                await ctx.reaches(batch_id, "scheduled")
            async with prefect(ctx.settings) as client:
                await client.set_flow_run_state(
                    (await ctx.fields(crashed))["flow_run_id"],
                    Crashed(message="worker killed"), force=True)
                await client.delete_flow_run(uuid.UUID((await ctx.fields(vanished))["flow_run_id"]))
            async with running(Reconciler(ctx.settings, options(reconcile_interval_s=0.2))):
                first = await ctx.reaches(crashed, "stop", timeout=20)
                second = await ctx.reaches(vanished, "stop", timeout=20)
                # Stopped batches leave the active index.
                async def index_empty() -> bool:
                    return await ctx.redis.zcard(keys.ACTIVE_RUNS) == 0
                await eventually(index_empty, timeout=10)
        assert (first["outcome"], first["reason"]) == ("crashed", "worker killed")
        assert second["outcome"] == "crashed"
        assert "no longer exists" in second["reason"]
    finally:
        await ctx.deployer.cleanup(ctx.batches)


async def forced_run(ctx: Ctx, batch_id: str, state: State[Any]) -> str:
    """The batch's flow run, once the running loop made it (no worker polls this pool), forced
    into `state` as if a worker or an engine had moved it there."""
    await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
    flow_run_id: str = (await ctx.reaches(batch_id, "scheduled"))["flow_run_id"]
    async with prefect(ctx.settings) as client:
        await client.set_flow_run_state(flow_run_id, state, force=True)
    return flow_run_id


async def test_reconciler_crashes_a_run_whose_heartbeats_stopped(topics: Settings,
                                                                 redis: Redis) -> None:
    ctx = make_ctx(topics, redis, None)
    try:
        batch_id = await ctx.batch()
        async with ctx.loop(bridge=False):
            # Running as far as Prefect knows, but no engine process sends heartbeats.
            flow_run_id = await forced_run(ctx, batch_id, Running())
            step = Event(type="step.state", batch_id=batch_id, pipeline_id=ctx.pipeline_id,
                         step="transform", state="running")
            await send(ctx.settings, ctx.settings.topic_events, batch_id, step.encode())

            async def step_running() -> bool:
                return (await ctx.fields(batch_id))["step:transform"] == "running"
            await eventually(step_running, timeout=10)
            async with running(Reconciler(ctx.settings, options(
                    reconcile_interval_s=0.2, zombie_after_s=1.0))):
                fields = await ctx.reaches(batch_id, "stop", timeout=20)
        assert fields["outcome"] == "crashed"
        assert "no heartbeat" in fields["reason"]
        # The step that was running when the run died is failed; the others are untouched.
        assert (fields["step:extract"], fields["step:transform"], fields["step:load"]) == (
            "none", "failed", "none")
        async with prefect(ctx.settings) as client:
            run = await client.read_flow_run(uuid.UUID(flow_run_id))
        assert run.state is not None and run.state.type.value == "CRASHED"
    finally:
        await ctx.deployer.cleanup(ctx.batches)


async def test_reconciler_crashes_a_run_a_worker_claimed_and_never_started(
        topics: Settings, redis: Redis) -> None:
    ctx = make_ctx(topics, redis, None)
    try:
        batch_id = await ctx.batch()
        async with ctx.loop(bridge=False):
            # Claimed by a worker that then stopped: Prefect keeps it Pending for ever.
            flow_run_id = await forced_run(ctx, batch_id, Pending())
            # Within its start window a claimed run is left alone, round after round.
            patient = Reconciler(ctx.settings, options(reconcile_interval_s=0.1,
                                                       pending_after_s=3600))
            async with running(patient):
                await eventually(lambda: patient.rounds >= 3, timeout=20)
            assert (await ctx.fields(batch_id))["state"] == "scheduled"
            async with running(Reconciler(ctx.settings, options(
                    reconcile_interval_s=0.2, pending_after_s=1.0))):
                fields = await ctx.reaches(batch_id, "stop", timeout=20)
        assert fields["outcome"] == "crashed"
        assert "did not start it" in fields["reason"]
        async with prefect(ctx.settings) as client:
            run = await client.read_flow_run(uuid.UUID(flow_run_id))
        assert run.state is not None and run.state.type.value == "CRASHED"
    finally:
        await ctx.deployer.cleanup(ctx.batches)
