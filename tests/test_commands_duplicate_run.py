"""A second run command for a batch that already has its flow run (a redelivery after a
rebalance, the API's unsent-run sweep or Idempotency-Key take-over: 'a run command twice
runs one flow run, harmless') meets Prefect answering 5xx on its (idempotent) create. The
command is given up, and the give-up fails the batch and cancels the flow run the FIRST run
command created: a healthy, accepted batch is killed by a redundant command."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from core.settings import Settings
from tests.test_commands_support import CREATE_RUN, CommandsCtx, commands_ctx, proxy_for, states_of
from tests.test_consumers_support import running, send_command

pytestmark = pytest.mark.timeout(150)


@pytest.fixture
async def ctx(topics: Settings, redis: Redis) -> AsyncIterator[CommandsCtx]:
    async with commands_ctx(topics, redis, "duprun") as context:
        yield context



async def test_a_redundant_run_command_given_up_does_not_kill_the_batchs_run(
        ctx: CommandsCtx) -> None:
    batch_id = await ctx.batch()
    broken = {"on": False}
    proxy = proxy_for(ctx.settings,
                      lambda m, p: "500" if broken["on"] and CREATE_RUN.match(p) else "pass")
    async with proxy.serving():
        via = ctx.settings.model_copy(update={"prefect_api_url": proxy.url})
        async with running(ctx.consumer(via, retry_max_attempts=2, cleanup_recheck_s=2)):
            await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
            await ctx.processed(1)
            first = await ctx.fields(batch_id)
            assert first["state"] == "scheduled" and first.get("flow_run_id")
            assert await states_of(ctx, batch_id) == ["SCHEDULED"]
            # Prefect's create answers 500 for a while; the same run command comes again.
            broken["on"] = True
            await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
            await ctx.processed(2)
            # Let the clean-up (if any was queued) do its pass.
            await ctx.no_cleanup_left()
            fields = await ctx.fields(batch_id)
            prefect_states = await states_of(ctx, batch_id)
    # The batch had its flow run; the redundant command changed nothing of it.
    assert (fields["state"], fields.get("outcome"), prefect_states) == (
        "scheduled", None, ["SCHEDULED"]), fields.get("reason")
