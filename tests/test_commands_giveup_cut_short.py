"""A give-up cut short must not leave a live flow run under a batch shown failed.

A run command is given up (Prefect created its flow run, then answered 500). `_reject` used to
show the batch's `failed` first and queue the `cancel` clean-up after it. Stopped between the
two (Redis away at the enqueue, then a SIGTERM, or a kill), the record was not committed, and
its redelivery found the batch `stop` and skipped it: no clean-up was ever queued, the run
stayed live, and the orphan sweep later cancelled it as "batch stopped", so the batch read
`cancelled`, as if someone had stopped it. The clean-up is now queued before the failure is
shown: cut short before, the redelivery does the command again; after, the job ends the run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from core.codec import Event
from core.settings import Settings
from tests.test_commands_support import CREATE_RUN, CommandsCtx, commands_ctx, proxy_for, states_of
from tests.test_consumers_support import committed, running, send_command

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
async def ctx(topics: Settings, redis: Redis) -> AsyncIterator[CommandsCtx]:
    async with commands_ctx(topics, redis, "giveup-cut") as context:
        yield context


@pytest.mark.parametrize("cut_at", ["queueing its clean-up", "showing its failure"])
async def test_a_give_up_cut_short_leaves_no_live_run_under_a_stopped_batch(
        ctx: CommandsCtx, cut_at: str) -> None:
    batch_id = await ctx.batch()
    s = ctx.settings
    proxy = proxy_for(s, lambda m, p: "done-500" if CREATE_RUN.match(p) else "pass")
    reached = asyncio.Event()
    async with proxy.serving():
        broken = s.model_copy(update={"prefect_api_url": proxy.url})
        consumer = ctx.consumer(broken, retry_max_attempts=2, cleanup_recheck_s=2,
                                shutdown_timeout_s=5)
        async with running(consumer):
            enqueue, emit = consumer.cleanup.enqueue, consumer.emitter.emit

            async def cut_enqueue(kind: str, pipeline_id: str, bid: str) -> None:
                if kind == "cancel" and cut_at == "queueing its clean-up":
                    reached.set()
                    raise RedisConnectionError("Connection reset by peer")  # Redis went away
                await enqueue(kind, pipeline_id, bid)

            async def cut_emit(events: Sequence[Event]) -> None:
                if cut_at == "showing its failure" and any(
                        e.event_id.startswith("fail-") for e in events):
                    reached.set()
                    raise RedisConnectionError("Connection reset by peer")
                await emit(events)
            consumer.cleanup.enqueue = cut_enqueue  # type: ignore[method-assign,assignment]
            consumer.emitter.emit = cut_emit  # type: ignore[method-assign]
            await send_command(s, "run", ctx.pipeline_id, batch_id)
            await asyncio.wait_for(reached.wait(), 60)
        # SIGTERM while the give-up waited for Redis: the run command is not committed.
        assert await committed(s, s.group_commands, s.topic_commands) == 0
    # The consumers start again (Prefect and Redis are back); the command comes again, and
    # any clean-up the give-up queued does its part.
    async with running(ctx.consumer(cleanup_recheck_s=2)):
        await ctx.processed(1)
        await ctx.no_cleanup_left(timeout=90)
    runs = await states_of(ctx, batch_id)
    fields = await ctx.fields(batch_id)
    shown = (fields["state"], fields.get("outcome"))
    if fields["state"] == "stop":
        # Given up after all: no run may go on under it, and its end is the give-up's.
        assert runs == ["CANCELLED"], f"a batch shown {shown} has its flow run {runs}"
        assert shown == ("stop", "failed"), fields.get("reason")
    else:
        # Never shown given up: the command that came again ran it.
        assert runs == ["SCHEDULED"] and fields.get("flow_run_id"), (shown, runs)
