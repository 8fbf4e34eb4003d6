"""A rebalance of the commands consumer's group never runs a command twice: the revoked
lane finishes (and commits) its command in flight before the new owner starts. Real Kafka,
Redis and Prefect (behind a proxy that makes creates slow)."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from core.settings import Settings
from tests.conftest import eventually
from tests.test_commands_support import CREATE_RUN, CommandsCtx, proxy_for
from tests.test_consumers_support import Deployer, flow_runs, prefect, running, send_command, unique

pytestmark = pytest.mark.timeout(150)


async def scheduled(ctx: CommandsCtx, batch_id: str) -> bool:
    return (await ctx.fields(batch_id)).get("state") == "scheduled"


async def test_a_rebalance_never_runs_a_command_twice(topics: Settings, redis: Redis) -> None:
    """Four run commands, Prefect slow to create (2 s each); a second consumer joins the
    group while the first is inside a create. Each batch's create reaches Prefect once."""
    settings = topics
    ctx = CommandsCtx(settings, redis, Deployer(settings), unique("test-lanes"))
    try:
        batches = [await ctx.batch() for _ in range(4)]
        proxy = proxy_for(settings, lambda m, p: "slow" if CREATE_RUN.match(p) else "pass",
                          later=2.0)
        async with proxy.serving():
            slow = settings.model_copy(update={"prefect_api_url": proxy.url})
            first, second = ctx.consumer(slow), ctx.consumer(slow)
            async with running(first):
                for batch_id in batches:
                    await send_command(settings, "run", ctx.pipeline_id, batch_id)

                def creating() -> bool:
                    return any(CREATE_RUN.match(p) for _, p, _ in proxy.seen)
                await eventually(creating, timeout=30)
                async with running(second):
                    async def all_scheduled() -> bool:
                        return all([await scheduled(ctx, b) for b in batches])
                    await eventually(all_scheduled, timeout=60, interval=0.1)
                    await ctx.processed(4, timeout=60)
        creates = sum(1 for _, p, _ in proxy.seen if CREATE_RUN.match(p))
        assert creates == 4
        print(f"\nhandled: first {first.lanes.handled}, second {second.lanes.handled}")
        assert first.lanes.handled + second.lanes.handled == 4
        async with prefect(settings) as client:
            for batch_id in batches:
                assert len(await flow_runs(client, batch_id)) == 1
    finally:
        await ctx.deployer.cleanup(ctx.batches)
