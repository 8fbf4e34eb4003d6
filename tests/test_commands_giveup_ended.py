"""A run command given up after its flow run had already ended: the batch's outcome is the
run's, not the give-up's `failed`. The run was created by a try whose answer was lost (a 500
after the effect), ran to its end on the stack's worker, and only then was the command given
up (the deployment missing: a 404), while the events that carry the run's end had not come
in yet. Real Prefect (behind a proxy that breaks chosen calls), Kafka and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web
from redis.asyncio import Redis

from consumers.bridge import PrefectBridge
from consumers.events import EventsConsumer
from core.settings import Settings
from tests.conftest import eventually
from tests.test_commands_support import CREATE_RUN, CommandsCtx, PrefectProxy
from tests.test_consumers_support import (
    Deployer,
    flow_runs,
    options,
    prefect,
    running,
    send_command,
    unique,
)

pytestmark = pytest.mark.timeout(300)
READ_RUNS = re.compile(r"^/api/flow_runs/filter$")


class GiveUpProxy(PrefectProxy):
    """The support proxy, plus "404": Prefect answers not found (a deployment deleted)."""

    async def _handle_one(self, request: web.Request) -> web.Response:
        if self.rule(request.method, request.path) == "404":
            await request.read()
            self.seen.append((request.method, request.path, "404"))
            return web.json_response({"detail": "Not found"}, status=404)
        return await super()._handle_one(request)


async def _states(settings: Settings, batch_id: str) -> list[str]:
    async with prefect(settings) as client:
        return [r.state.type.value if r.state is not None else "NONE"
                for r in await flow_runs(client, batch_id)]


@contextlib.asynccontextmanager
async def _given_up_after_it_completed(
        topics: Settings, redis: Redis, tmp_path: Path,
        at_give_up: Callable[[str, str], str]) -> AsyncIterator[tuple[CommandsCtx, str]]:
    """Runs the sequence; `at_give_up(method, path)` is the proxy's rule once the run has
    completed. Yields once the command was given up."""
    ctx = CommandsCtx(topics, redis, Deployer(topics, tmp_path, {"sleep": 0.1}),
                      unique("test-ended"))
    gave_up = asyncio.Event()

    def rule(method: str, path: str) -> str:
        if gave_up.is_set():
            return at_give_up(method, path)
        return "done-500" if CREATE_RUN.match(path) else "pass"

    proxy = GiveUpProxy(ctx.settings.prefect_api_url.removesuffix("/api"), rule)
    try:
        batch_id = await ctx.batch(steps=("a", "b"))
        async with proxy.serving():
            broken = ctx.settings.model_copy(update={"prefect_api_url": proxy.url})
            async with running(ctx.consumer(broken, retry_max_attempts=100_000,
                                            retry_max_elapsed_s=240, retry_max_s=0.5)):
                await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
                async def completed_in_prefect() -> bool:
                    return await _states(ctx.settings, batch_id) == ["COMPLETED"]
                await eventually(completed_in_prefect, timeout=180, interval=0.2)
                gave_up.set()
                await ctx.processed(1, timeout=60)
                yield ctx, batch_id
    finally:
        await ctx.deployer.cleanup(ctx.batches)


async def test_a_run_given_up_after_its_flow_run_completed_says_completed(
        topics: Settings, redis: Redis, tmp_path: Path) -> None:
    def deployment_gone(method: str, path: str) -> str:
        return "404" if CREATE_RUN.match(path) else "pass"

    async with _given_up_after_it_completed(topics, redis, tmp_path, deployment_gone) as (
            ctx, batch_id):
        fields = await ctx.fields(batch_id)
    # Read from Prefect as it gave up: the run's own end, never a `failed` to undo.
    assert (fields["state"], fields.get("outcome")) == ("stop", "completed"), fields


async def test_the_give_ups_failed_yields_to_the_runs_end_arriving_later(
        topics: Settings, redis: Redis, tmp_path: Path) -> None:
    def prefect_unreadable(method: str, path: str) -> str:
        if CREATE_RUN.match(path):
            return "404"
        return "500" if READ_RUNS.match(path) else "pass"

    async with _given_up_after_it_completed(topics, redis, tmp_path, prefect_unreadable) as (
            ctx, batch_id):
        failed = await ctx.fields(batch_id)
    assert (failed["state"], failed.get("outcome")) == ("stop", "failed")
    # The run's end comes in late, through the bridge (its backfill covers the last
    # minutes) and the events consumer: an end before the give-up still decides.
    async with running(EventsConsumer(ctx.settings, options())), \
            running(PrefectBridge(ctx.settings, options())):
        async def completed() -> bool:
            return (await ctx.fields(batch_id)).get("outcome") == "completed"
        await eventually(completed, timeout=90, interval=0.2)
    fields = await ctx.fields(batch_id)
    assert fields["state"] == "stop"
    assert {fields.get("step:a"), fields.get("step:b")} == {"success"}
