"""A run command given up after Prefect created its flow run (a 500 after the effect) says
`stop`/`failed` at once, and queues a clean-up that cancels that flow run so nothing runs
for it. That cancellation is the give-up's own doing, yet its Cancelled state, stamped later
than the give-up's `failed` (which carries the command's time), became the latest stop: once
the bridge brought it in, the batch read `stop`/`cancelled`, as if someone had stopped it.
Nobody stopped the batch; its run command failed. The clean-up now says the failure again
just after that Cancelled."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from consumers.bridge import PrefectBridge
from consumers.events import EventsConsumer
from core.codec import decode_event
from core.settings import Settings
from tests.conftest import eventually
from tests.helpers import read_topic
from tests.test_commands_support import CREATE_RUN, SET_STATE, CommandsCtx, commands_ctx, proxy_for
from tests.test_consumers_support import (
    committed,
    flow_runs,
    options,
    prefect,
    running,
    send_command,
)

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
async def ctx(topics: Settings, redis: Redis) -> AsyncIterator[CommandsCtx]:
    async with commands_ctx(topics, redis, "giveup-kept") as context:
        yield context


async def test_a_given_up_run_stays_failed_after_its_own_cleanup_cancels_the_run(
        ctx: CommandsCtx) -> None:
    batch_id = await ctx.batch()
    proxy = proxy_for(ctx.settings, lambda m, p: "done-500" if CREATE_RUN.match(p) else "pass")
    async with proxy.serving():
        broken = ctx.settings.model_copy(update={"prefect_api_url": proxy.url})
        async with running(ctx.consumer(broken, retry_max_attempts=2, cleanup_recheck_s=2)):
            await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
            await ctx.processed(1)
            given_up = await ctx.fields(batch_id)
            assert (given_up["state"], given_up["outcome"]) == ("stop", "failed")
            await ctx.no_cleanup_left()
    async with prefect(ctx.settings) as client:
        [run] = await flow_runs(client, batch_id)
    flow_run_id = str(run.id)
    assert run.state is not None and run.state.is_final()
    # The bridge brings the flow run's end in, the events consumer applies it.
    async with running(EventsConsumer(ctx.settings, options())), \
            running(PrefectBridge(ctx.settings, options())):
        s = ctx.settings

        def run_ended(records: list[Any]) -> bool:
            return any((e := decode_event(r.value)).flow_run_id == flow_run_id
                       and e.state == "stop" for r in records)
        records = await read_topic(s, s.topic_events, run_ended, timeout=90)

        async def all_applied() -> bool:
            return await committed(s, s.group_events, s.topic_events) >= len(records)
        await eventually(all_applied, timeout=30, interval=0.2)
    fields = await ctx.fields(batch_id)
    assert (fields["state"], fields.get("outcome")) == ("stop", "failed"), fields.get("reason")


async def test_a_given_up_stop_whose_cancel_landed_stays_cancelled(ctx: CommandsCtx) -> None:
    """A stop given up after Prefect did cancel its run (a 500 after the effect): the
    give-up records that Cancelled, the user's stop. The clean-up said the failure again
    over it for any run Cancelled since the job began; only the runs the job cancelled
    itself count now."""
    batch_id = await ctx.batch()
    mode = {"stop": False, "reads": 0}

    def rule(method: str, path: str) -> str:
        if not mode["stop"]:
            return "pass"
        if path == "/api/flow_runs/filter":
            mode["reads"] += 1
            return "500" if mode["reads"] == 1 else "pass"  # a brown-out's first read
        if SET_STATE.match(path):
            return "done-500"  # Prefect did it, the answer was lost to a 500
        return "pass"

    proxy = proxy_for(ctx.settings, rule)
    async with proxy.serving():
        broken = ctx.settings.model_copy(update={"prefect_api_url": proxy.url})
        async with running(ctx.consumer(broken, retry_max_attempts=2, cleanup_recheck_s=2)):
            await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
            await ctx.processed(1)

            async def scheduled() -> bool:
                return bool((await ctx.fields(batch_id)).get("flow_run_id"))
            await eventually(scheduled, timeout=30)
            mode["stop"] = True
            await send_command(ctx.settings, "stop", ctx.pipeline_id, batch_id)
            await ctx.processed(2)
            given_up = await ctx.fields(batch_id)
            await ctx.no_cleanup_left(timeout=60)
    fields = await ctx.fields(batch_id)
    assert (given_up["state"], given_up.get("outcome")) == ("stop", "cancelled")
    assert (fields["state"], fields.get("outcome")) == ("stop", "cancelled"), fields.get("reason")
