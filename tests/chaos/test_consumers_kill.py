"""Scenario 1: the consumers process SIGKILLed three times while offset events flow.

>= 50k offset events (duplicates re-sent, older offsets re-sent after newer) to 24 batches;
a 5 Hz poller GETs every batch throughout. Nothing may be lost or go backwards: each
series ends at the highest value sent, the poller sees no regression and no 5xx.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from redis.asyncio import Redis

from tests.chaos.stackctl import ChaosStack
from tests.chaos.streams import OffsetStream, seed_batches, send
from tests.chaos.watch import Poller, lost_updates, report, settle_offsets

BATCHES = 24
EVENTS = 52_000
RATE = 2_000.0  # events/s: ~26 s of stream, room for three kills and restarts
KILLS = 3
POLLED = 8  # batches the 5 Hz poller reads: all 24 would not keep 5 Hz on 2 busy cores


@pytest.mark.timeout(240)
async def test_consumers_killed_three_times(chaos: ChaosStack, chaos_redis: Redis,
                                            http: httpx.AsyncClient) -> None:
    pipeline_id, batch_ids = await seed_batches(chaos_redis, chaos.settings, "chaos-kill", BATCHES)
    stream = OffsetStream(pipeline_id, batch_ids).build(EVENTS)
    recoveries: list[float] = []

    async def killer() -> None:
        for _ in range(KILLS):
            await asyncio.sleep(3.0)
            t_kill = await asyncio.to_thread(chaos.kill, "consumers")
            await asyncio.to_thread(chaos.up, "consumers")
            recoveries.append(time.monotonic() - t_kill)

    async with Poller(http, pipeline_id, batch_ids[:POLLED]) as poller:
        kills = asyncio.create_task(killer())
        sent_s = await send(chaos.settings, stream.records, RATE)
        await kills
        seen, catch_up = await settle_offsets(http, pipeline_id, batch_ids, stream.expected, 90)
        await asyncio.sleep(0.5)  # one more poller round on the settled state
    lost = lost_updates(stream.expected, seen)
    report("consumers SIGKILLed x3 under an offsets stream",
           stream=stream.describe(), sent_in=f"{sent_s:.1f}s ({len(stream.records) / sent_s:,.0f}/s)",
           consumers_back_after_each_kill=", ".join(f"{r:.1f}s" for r in recoveries),
           all_offsets_visible_after_stream_end=f"{catch_up:.1f}s",
           lost_updates=f"{len(lost)} of {len(stream.expected)} series", poll=poller.describe())
    assert len(recoveries) == KILLS
    assert not lost, f"{len(lost)} series lost their last update: {lost[:10]}"
    assert not poller.regressions, f"GET went backwards: {poller.regressions[:10]}"
    assert poller.server_errors() == 0 and not poller.bad, poller.bad[:10]
