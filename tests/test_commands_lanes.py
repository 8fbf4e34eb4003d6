"""The commands consumer's loop: a slow delete holds up nobody, the group membership never
lapses, and a rebalance never runs a command twice. Real Kafka, Redis and Prefect."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prefect.states import Running
from redis.asyncio import Redis

from core.settings import Settings
from tests.conftest import eventually
from tests.test_commands_support import CommandsCtx, commands_ctx
from tests.test_consumers_support import (
    flow_runs,
    prefect,
    running,
    send_command,
    store_for,
)

pytestmark = pytest.mark.timeout(150)


@pytest.fixture
def test_settings(test_settings: Settings) -> Settings:
    """One commands partition: every batch's commands queue behind each other."""
    return test_settings.model_copy(update={"commands_partitions": 1})


@pytest.fixture
async def ctx(topics: Settings, redis: Redis) -> AsyncIterator[CommandsCtx]:
    async with commands_ctx(topics, redis, "test-lanes") as context:
        yield context


async def scheduled(ctx: CommandsCtx, batch_id: str) -> bool:
    return (await ctx.fields(batch_id)).get("state") == "scheduled"


async def test_a_slow_delete_does_not_hold_up_the_next_batch(ctx: CommandsCtx) -> None:
    slow, other = await ctx.batch(), await ctx.batch()
    async with running(ctx.consumer(cleanup_recheck_s=1.0)):
        await send_command(ctx.settings, "run", ctx.pipeline_id, slow)
        await ctx.processed(1)
        # Its run "started" (no worker polls this pool, so nobody ends it): a delete must
        # wait for the cancellation (delete_cancel_wait_s = 8 s), then let events settle.
        flow_run_id = uuid.UUID((await ctx.fields(slow))["flow_run_id"])
        async with prefect(ctx.settings) as client:
            await client.set_flow_run_state(flow_run_id, Running(), force=True)
        assert await store_for(ctx.redis, ctx.settings).hide(ctx.pipeline_id, slow)
        await send_command(ctx.settings, "delete", ctx.pipeline_id, slow)
        t0 = time.monotonic()
        await send_command(ctx.settings, "run", ctx.pipeline_id, other)
        await eventually(lambda: scheduled(ctx, other), timeout=20, interval=0.05)
        waited = time.monotonic() - t0
        async with prefect(ctx.settings) as client:
            still = await flow_runs(client, slow)
            # The delete is still at work (cancel asked, or about to be; nothing deleted).
            assert [r.state.type.value for r in still] in (["RUNNING"], ["CANCELLING"])
            print(f"\nthe next batch was scheduled {waited:.2f} s after a slow delete")
            assert waited < 4.0

            async def gone() -> bool:
                return await flow_runs(client, slow) == []
            await eventually(gone, timeout=40, interval=0.2)
        await ctx.no_cleanup_left()


async def test_the_loop_keeps_polling_while_a_command_waits_for_prefect(ctx: CommandsCtx) -> None:
    batch_id = await ctx.batch()
    down = ctx.settings.model_copy(update={"prefect_api_url": "http://127.0.0.1:9/api"})
    consumer = ctx.consumer(down)
    polls: list[float] = []
    async with running(consumer):
        inner = consumer._consumer
        assert inner is not None
        real = inner.getmany

        async def timed(*args: Any, **kwargs: Any) -> Any:
            polls.append(time.monotonic())
            return await real(*args, **kwargs)
        inner.getmany = timed
        await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
        await eventually(lambda: consumer.retries >= 6, timeout=30)
        t_end = time.monotonic()
    gaps = [b - a for a, b in itertools.pairwise(polls)] + [t_end - polls[-1]]
    print(f"\n{len(polls)} polls while the run retried {consumer.retries} times; "
          f"longest gap {max(gaps):.2f} s")
    assert max(gaps) < 2.0  # poll_timeout_ms = 100 in the tests' options
    assert (await ctx.fields(batch_id))["state"] == "pending"
