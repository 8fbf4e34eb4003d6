"""A stop command accepted while Redis still showed the batch running, though its flow run had
already completed (the bridge lagging a moment), then given up in a Prefect brown-out (its
reads answer 500). The give-up's `failed` carried the stop command's ts, later than the run's
Completed, so the Completed lost when it came in: the batch read stop/failed for good, for a
run that completed before anyone asked to stop it. A given-up stop's failure is now a guess
(ts 0) that any real end beats."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from consumers.bridge import PrefectBridge
from consumers.events import EventsConsumer
from core.codec import decode_event
from core.settings import Settings
from tests.conftest import eventually
from tests.helpers import read_topic
from tests.test_commands_support import CommandsCtx, PrefectProxy, states_of
from tests.test_consumers_support import (
    Deployer,
    committed,
    options,
    running,
    send_command,
    unique,
)

pytestmark = pytest.mark.timeout(300)
READ_RUNS = re.compile(r"^/api/flow_runs/filter$")


async def test_a_stop_given_up_after_the_run_completed_does_not_say_failed(
        topics: Settings, redis: Redis, tmp_path: Path) -> None:
    ctx = CommandsCtx(topics, redis, Deployer(topics, tmp_path, {"sleep": 0.1}),
                      unique("rev-stopend"))
    brownout = asyncio.Event()

    def rule(method: str, path: str) -> str:
        return "500" if brownout.is_set() and READ_RUNS.match(path) else "pass"

    proxy = PrefectProxy(ctx.settings.prefect_api_url.removesuffix("/api"), rule)
    try:
        batch_id = await ctx.batch(steps=("a", "b"))
        async with proxy.serving():
            broken = ctx.settings.model_copy(update={"prefect_api_url": proxy.url})
            async with running(ctx.consumer(broken, retry_max_attempts=2,
                                            cleanup_recheck_s=2, retry_max_s=0.5)):
                await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
                await ctx.processed(1)

                async def completed_in_prefect() -> bool:
                    return await states_of(ctx, batch_id) == ["COMPLETED"]
                await eventually(completed_in_prefect, timeout=120, interval=0.2)
                # Redis still shows the run as the commands consumer left it (the bridge
                # and events consumer have not brought the end in yet): the API accepts a
                # stop. Prefect then browns out (reads 500) while the stop is handled.
                shown = await ctx.fields(batch_id)
                assert shown["state"] == "scheduled"
                brownout.set()
                await send_command(ctx.settings, "stop", ctx.pipeline_id, batch_id)
                await ctx.processed(2, timeout=60)
                given_up = await ctx.fields(batch_id)
                assert (given_up["state"], given_up.get("outcome")) == ("stop", "failed")
                brownout.clear()  # Prefect is back
                await ctx.no_cleanup_left(timeout=60)
        # The run's end comes in, through the bridge and the events consumer.
        s = ctx.settings
        async with running(EventsConsumer(s, options())), running(PrefectBridge(s, options())):
            def run_completed(records: list[Any]) -> bool:
                return any((e := decode_event(r.value)).type == "batch.state"
                           and e.batch_id == batch_id and e.outcome == "completed"
                           for r in records)
            records = await read_topic(s, s.topic_events, run_completed, timeout=90)

            async def all_applied() -> bool:
                return await committed(s, s.group_events, s.topic_events) >= len(records)
            await eventually(all_applied, timeout=30, interval=0.2)
        fields = await ctx.fields(batch_id)
        assert await states_of(ctx, batch_id) == ["COMPLETED"]
        assert (fields["state"], fields.get("outcome")) == ("stop", "completed"), (
            f"Prefect holds COMPLETED (ended before the stop was sent); the batch reads "
            f"{fields['state']}/{fields.get('outcome')}: {fields.get('reason')!r}")
    finally:
        await ctx.deployer.cleanup(ctx.batches)
