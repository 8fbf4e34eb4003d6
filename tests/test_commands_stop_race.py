"""A stop racing the worker: the batch's outcome must agree with its flow run's final state.

Runs of a quick pipeline on the stack's worker: half stopped a random moment (0-4 s) after
the worker claimed their flow run (Pending, while its engine starts), half a random moment
(0-1.5 s) after it was created, so stops land on Scheduled, Pending and Running runs. Before the fix a stop forced Cancelled onto a Pending run; the
engine then ran it anyway (Cancelled -> Running is allowed), so the batch said `cancelled`
while Prefect held COMPLETED.

The suite stops 12 runs (6 in the worker's start-up), to keep CI's time; the same race is
hunted longer with DHUB_TEST_RACE_RUNS=30 or more.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from consumers.bridge import PrefectBridge
from consumers.commands import CommandsConsumer
from consumers.events import EventsConsumer
from core.settings import Settings
from tests.conftest import eventually
from tests.test_consumers_support import (
    Deployer,
    PipelineCtx,
    options,
    prefect,
    running,
    send_command,
    unique,
)

pytestmark = pytest.mark.timeout(540)
RUNS = int(os.environ.get("DHUB_TEST_RACE_RUNS", "12"))
# The batch outcome each final flow-run state must produce.
AGREES = {"COMPLETED": "completed", "CANCELLED": "cancelled", "FAILED": "failed",
          "CRASHED": "failed"}


@contextlib.asynccontextmanager
async def whole_loop(ctx: PipelineCtx) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(running(EventsConsumer(ctx.settings, options())))
        await stack.enter_async_context(running(CommandsConsumer(
            ctx.settings, options(stop_cancelling_wait_s=30.0, stop_unstarted_wait_s=60.0),
            ensure=ctx.deployer.ensure)))
        await stack.enter_async_context(running(PrefectBridge(ctx.settings, options())))
        yield


async def test_stops_right_after_creation_never_contradict_the_engine(
        topics: Settings, redis: Redis, tmp_path: Path) -> None:
    ctx = PipelineCtx(topics, redis, Deployer(topics, tmp_path, {"sleep": 0.2}),
                      unique("test-race"))
    rng = random.Random()
    try:
        batch_ids = [await ctx.batch(steps=("a", "b")) for _ in range(RUNS)]
        async with whole_loop(ctx):
            hit: Counter[str] = Counter()  # the run's state read right after its stop was sent

            async def run_then_stop(n: int, batch_id: str) -> None:
                await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)

                async def created() -> str | None:
                    return (await ctx.fields(batch_id)).get("flow_run_id")
                flow_run_id = uuid.UUID(str(await eventually(created, timeout=60,
                                                            interval=0.02)))
                async with prefect(ctx.settings) as client:
                    if n % 2 == 0:
                        # Right after the worker claimed it: the race of the issue.
                        async def claimed() -> str | None:
                            run = await client.read_flow_run(flow_run_id)
                            state = run.state.type.value if run.state else ""
                            return state if state != "SCHEDULED" else None
                        await eventually(claimed, timeout=90, interval=0.02)
                        # Anywhere in the worker's start-up: the engine reads the run, then
                        # proposes Running; a stop in between is the race of the issue.
                        await asyncio.sleep(rng.uniform(0.0, 4.0))
                    else:
                        await asyncio.sleep(rng.uniform(0.0, 1.5))  # the race itself
                    await send_command(ctx.settings, "stop", ctx.pipeline_id, batch_id)
                    run = await client.read_flow_run(flow_run_id)
                    hit[run.state.type.value if run.state else "NONE"] += 1

            sem = asyncio.Semaphore(6)

            async def one(n: int, batch_id: str) -> None:
                async with sem:
                    await run_then_stop(n, batch_id)
            await asyncio.gather(*(one(n, b) for n, b in enumerate(batch_ids)))

            async def snapshot() -> dict[str, tuple[str, str, str]]:
                """batch -> (its state, its outcome, its flow run's state)."""
                out: dict[str, tuple[str, str, str]] = {}
                async with prefect(ctx.settings) as client:
                    for batch_id in batch_ids:
                        fields = await ctx.fields(batch_id)
                        run = await client.read_flow_run(uuid.UUID(fields["flow_run_id"]))
                        state = run.state.type.value if run.state is not None else "NONE"
                        out[batch_id] = (fields["state"], fields.get("outcome", ""), state)
                return out

            async def settled() -> dict[str, tuple[str, str]] | None:
                """batch -> (its outcome, its flow run's state), once all are final."""
                now = await snapshot()
                if any(b != "stop" or s not in AGREES for b, _, s in now.values()):
                    return None
                return {k: (o, s) for k, (_, o, s) in now.items()}

            try:
                result: dict[str, tuple[str, str]] = await eventually(  # type: ignore[assignment]
                    settled, timeout=200, interval=1.0)
            except AssertionError:
                raise AssertionError(f"not all final: {await snapshot()}") from None
            # Final in Prefect and in Redis; a little longer for a late contradiction (the
            # engine running a run that had been reported cancelled).
            await asyncio.sleep(3)
            again = await settled()
        assert again is not None
        print(f"\n{RUNS} runs stopped while {dict(hit)}: outcomes "
              f"{dict(Counter(o for o, _ in again.values()))}, Prefect "
              f"{dict(Counter(s for _, s in again.values()))}")
        wrong = {b: v for b, v in again.items() if AGREES[v[1]] != v[0]}
        if wrong:
            history: dict[str, list[str]] = {}
            async with prefect(ctx.settings) as client:
                for batch_id in wrong:
                    flow_run_id = uuid.UUID((await ctx.fields(batch_id))["flow_run_id"])
                    states = await client.read_flow_run_states(flow_run_id)
                    history[batch_id] = [f"{st.timestamp:%H:%M:%S.%f} {st.name} "
                                         f"{(st.message or '')[:50]}" for st in states]
            raise AssertionError(f"{len(wrong)} of {RUNS} batches contradict Prefect: "
                                 f"{wrong}; histories {history}")
        assert result.keys() == again.keys()
    finally:
        await ctx.deployer.cleanup(ctx.batches)
