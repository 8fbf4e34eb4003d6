"""Scenario 11: the consumers and the API stopped by SIGTERM, three times each, while offset
events flow, and started again each time.

A stop cancels tasks that are talking to Redis (the API's change feed and outbox drain, a
consumer part past its grace). A cancel a library drops there leaves the process running
until the stack SIGKILLs it after `stop_timeout_s` (15 s): what the Redis client did on Python
3.11 (`core/redis_connection.py`). Each stop must end the process by itself, well inside that,
and what was sent meanwhile must all be visible once the stream is over.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from redis.asyncio import Redis

from tests.chaos.stackctl import ChaosStack
from tests.chaos.streams import OffsetStream, seed_batches, send
from tests.chaos.watch import lost_updates, report, settle_offsets

BATCHES = 24
EVENTS = 40_000
RATE = 1_500.0  # events/s: ~27 s of stream, room for six stops and restarts
ORDER = ("consumers", "api") * 3
WITHIN_S = 12.0  # below the stack's 15 s from SIGTERM to SIGKILL


@pytest.mark.timeout(300)
async def test_consumers_and_api_stopped_by_sigterm_under_an_offsets_stream(
        chaos: ChaosStack, chaos_redis: Redis, http: httpx.AsyncClient) -> None:
    pipeline_id, batch_ids = await seed_batches(chaos_redis, chaos.settings, "chaos-stop", BATCHES)
    stream = OffsetStream(pipeline_id, batch_ids).build(EVENTS)
    stops: list[tuple[str, float]] = []
    cut_short: list[str] = []  # consumer parts cancelled after their grace while stopping

    async def stopper() -> None:
        for part in ORDER:
            await asyncio.sleep(2.0)
            stops.append((part, await asyncio.to_thread(chaos.terminate, part, WITHIN_S)))
            if part == "consumers":  # read before `up` starts a new log
                cut_short.extend(line for line in chaos.log(part).read_text(
                    errors="replace").splitlines() if "did not stop in time" in line)
            await asyncio.to_thread(chaos.up, part)

    stopping = asyncio.create_task(stopper())
    sent_s = await send(chaos.settings, stream.records, RATE)
    await stopping
    seen, catch_up = await settle_offsets(http, pipeline_id, batch_ids, stream.expected, 90)
    lost = lost_updates(stream.expected, seen)
    report("consumers and API stopped by SIGTERM x3 each under an offsets stream",
           stream=stream.describe(), sent_in=f"{sent_s:.1f}s",
           stopped_in=", ".join(f"{part} {s:.1f}s" for part, s in stops),
           all_offsets_visible_after_stream_end=f"{catch_up:.1f}s",
           lost_updates=f"{len(lost)} of {len(stream.expected)} series")
    assert [part for part, _ in stops] == list(ORDER)
    assert not lost, f"{len(lost)} series lost their last update: {lost[:10]}"
    # A part cancelled after its grace stopped, but not by finishing its work.
    assert not cut_short, cut_short
