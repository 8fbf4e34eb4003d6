"""Commands given up and deletes racing creates: no flow run outlives its batch.

Prefect is the real server, behind an HTTP proxy that breaks chosen calls; runs stay
Scheduled (deployments on a pool no worker polls) unless the test moves them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from consumers.plumbing import dlq
from consumers.plumbing.cleanup import member
from core import keys
from core.settings import Settings
from tests.conftest import eventually
from tests.helpers import read_topic
from tests.test_commands_support import (
    CREATE_RUN,
    SET_STATE,
    CommandsCtx,
    commands_ctx,
    proxy_for,
    states_of,
)
from tests.test_consumers_support import (
    running,
    send_command,
    store_for,
)

pytestmark = pytest.mark.timeout(150)


@pytest.fixture
async def ctx(topics: Settings, redis: Redis) -> AsyncIterator[CommandsCtx]:
    async with commands_ctx(topics, redis, "test-giveup") as context:
        yield context



async def test_a_run_given_up_after_prefect_created_its_flow_run_cancels_it(
        ctx: CommandsCtx) -> None:
    batch_id = await ctx.batch()
    # Prefect creates the flow run, then the answer is a 500: a deterministic failure.
    proxy = proxy_for(ctx.settings, lambda m, p: "done-500" if CREATE_RUN.match(p) else "pass")
    async with proxy.serving():
        broken = ctx.settings.model_copy(update={"prefect_api_url": proxy.url})
        async with running(ctx.consumer(broken, retry_max_attempts=2, cleanup_recheck_s=2)):
            command = await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
            await ctx.processed(1)
            fields = await ctx.fields(batch_id)
            assert (fields["state"], fields["outcome"]) == ("stop", "failed")
            assert "gave up after 2 attempts" in fields["reason"] and "500" in fields["reason"]

            async def cancelled() -> bool:
                return await states_of(ctx, batch_id) == ["CANCELLED"]
            await eventually(cancelled, timeout=20, interval=0.2)
            await ctx.no_cleanup_left()
    assert sum(1 for _, p, _ in proxy.seen if CREATE_RUN.match(p)) == 2
    [dead] = await read_topic(ctx.settings, ctx.settings.topic_dlq, lambda r: len(r) >= 1)
    assert dead.value == command.encode()
    assert b"run failed" in dict(dead.headers)[dlq.REASON]


async def test_a_stop_given_up_fails_the_batch_and_still_cancels_its_run(
        ctx: CommandsCtx) -> None:
    batch_id = await ctx.batch()
    failures = {"left": 2}

    def rule(method: str, path: str) -> str:
        if SET_STATE.match(path) and failures["left"] > 0:
            failures["left"] -= 1
            return "500"
        return "pass"

    proxy = proxy_for(ctx.settings, rule)
    async with proxy.serving():
        broken = ctx.settings.model_copy(update={"prefect_api_url": proxy.url})
        async with running(ctx.consumer(broken, retry_max_attempts=2, cleanup_recheck_s=2)):
            await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
            await ctx.processed(1)
            assert await states_of(ctx, batch_id) == ["SCHEDULED"]
            await send_command(ctx.settings, "stop", ctx.pipeline_id, batch_id)
            await ctx.processed(2)
            fields = await ctx.fields(batch_id)
            assert (fields["state"], fields["outcome"]) == ("stop", "failed")
            assert fields["reason"].startswith("stop failed")

            async def cancelled() -> bool:
                return await states_of(ctx, batch_id) == ["CANCELLED"]
            await eventually(cancelled, timeout=20, interval=0.2)


async def test_a_delete_that_overtakes_a_create_in_flight_leaves_no_flow_run(
        ctx: CommandsCtx) -> None:
    """The create answers 500 at once but lands in Prefect later (in flight inside Prefect);
    the delete right behind it finds nothing at first. The clean-up looks again until the
    create window is over, so the late run is removed too."""
    batch_id = await ctx.batch()
    proxy = proxy_for(ctx.settings, lambda m, p: "late-500" if CREATE_RUN.match(p) else "pass")
    proxy.release = asyncio.Event()  # the create lands once the delete's first pass is over
    store = store_for(ctx.redis, ctx.settings)
    async with proxy.serving():
        broken = ctx.settings.model_copy(update={"prefect_api_url": proxy.url})
        async with running(ctx.consumer(broken, retry_max_attempts=1, cleanup_recheck_s=8)):
            await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)

            async def creating() -> bool:
                # A run taken after the hide would rightly create nothing: the delete must
                # come while the create is in flight.
                return any(CREATE_RUN.match(p) for _, p, _ in proxy.seen)
            await eventually(creating, timeout=20)
            assert await store.hide(ctx.pipeline_id, batch_id)  # what DELETE does first
            await send_command(ctx.settings, "delete", ctx.pipeline_id, batch_id)
            await ctx.processed(2)
            job = member("delete", ctx.pipeline_id, batch_id)

            async def first_pass_found_nothing() -> bool:
                # A pass that found nothing sets the job due at the end of the create window
                # (a claimed job is due at the end of its lease, much later).
                since, due = await asyncio.gather(ctx.redis.hget(keys.CLEANUP_SINCE, job),
                                                  ctx.redis.zscore(keys.CLEANUP_DUE, job))
                return since is not None and due is not None \
                    and abs(due - (float(since) + 8)) < 0.01
            await eventually(first_pass_found_nothing, timeout=20)
            assert await states_of(ctx, batch_id) == []  # not landed yet
            proxy.release.set()
            await eventually(lambda: proxy.landed, timeout=20)
            assert proxy.landed == [201]  # Prefect created the run after the delete looked
            await ctx.no_cleanup_left(timeout=40)
            assert await states_of(ctx, batch_id) == []
    assert await states_of(ctx, batch_id) == []
    assert await ctx.redis.exists(keys.batch(ctx.pipeline_id, batch_id)) == 0


async def test_a_run_whose_batch_vanished_during_the_create_is_removed(ctx: CommandsCtx) -> None:
    """The other order: the run command finds its batch, Prefect is slow to create the run,
    and the batch is deleted meanwhile; the run path sees that and cleans up itself."""
    batch_id = await ctx.batch()
    proxy = proxy_for(ctx.settings, lambda m, p: "slow" if CREATE_RUN.match(p) else "pass",
                      later=2.0)
    store = store_for(ctx.redis, ctx.settings)
    async with proxy.serving():
        broken = ctx.settings.model_copy(update={"prefect_api_url": proxy.url})
        async with running(ctx.consumer(broken, cleanup_recheck_s=2)):
            await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)

            async def creating() -> bool:
                return any(CREATE_RUN.match(p) for _, p, _ in proxy.seen)
            await eventually(creating, timeout=20)
            await store.purge(ctx.pipeline_id, batch_id)  # gone, as after a finished delete
            await ctx.processed(1)

            async def removed() -> Any:
                return await states_of(ctx, batch_id) == [] and not await ctx.redis.exists(
                    keys.batch(ctx.pipeline_id, batch_id))
            await eventually(removed, timeout=20, interval=0.2)
            await ctx.no_cleanup_left()
    assert await states_of(ctx, batch_id) == []
