"""Scenario 3: Redis SIGKILLed and restarted under traffic.

While it is down, GET answers 503 JSON (or 200 from the cache), none waits over 10 s. Once
it is back the same API process recovers on its own: a burst of 70 concurrent requests
2 s later all succeed. The events Kafka acknowledged meanwhile are all applied.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from redis.asyncio import Redis

from tests.chaos.stackctl import ChaosStack
from tests.chaos.streams import OffsetStream, seed_batches, send
from tests.chaos.watch import Poller, client, is_json, lost_updates, report, settle_offsets

BATCHES = 20
EVENTS = 15_000
RATE = 1_000.0
DOWN_S = 4.0
BURST = 70
HANG_S = 10.0


async def burst(http: httpx.AsyncClient, pipeline_id: str, batch_ids: list[str]) -> list[int]:
    """70 concurrent requests across the read endpoints; their statuses (0: no answer)."""
    paths = [f"/api/v1/batches/{pipeline_id}/{batch_ids[i % len(batch_ids)]}" for i in range(50)]
    paths += [f"/api/v1/batches/{pipeline_id}/?limit=10"] * 10
    paths += [f"/api/v1/batches/{pipeline_id}"] * 10

    async def one(path: str) -> int:
        try:
            response = await http.get(path)
        except httpx.HTTPError:
            return 0
        return response.status_code if is_json(response) else -response.status_code

    return list(await asyncio.gather(*(one(p) for p in paths)))


@pytest.mark.timeout(180)
async def test_redis_killed_and_restarted(chaos: ChaosStack, chaos_redis: Redis,
                                          http: httpx.AsyncClient) -> None:
    pipeline_id, batch_ids = await seed_batches(chaos_redis, chaos.settings, "chaos-rr", BATCHES)
    stream = OffsetStream(pipeline_id, batch_ids, seed=5).build(EVENTS)
    api_pid = chaos.pid("api")
    fault: dict[str, float] = {}
    bursts: dict[str, list[int]] = {}

    async with client(chaos.api, chaos.token, timeout=HANG_S + 5, connections=BURST) as many:
        bursts["before"] = await burst(many, pipeline_id, batch_ids)  # fills the API's pool

        async def kill_and_restart() -> None:
            await asyncio.sleep(3.0)
            fault["killed"] = await asyncio.to_thread(chaos.kill, "redis")
            await asyncio.sleep(DOWN_S)
            fault["restart"] = time.monotonic()
            await asyncio.to_thread(chaos.up, "redis")
            fault["back"] = time.monotonic()
            await asyncio.sleep(2.0)
            bursts["after"] = await burst(many, pipeline_id, batch_ids)

        async with Poller(http, pipeline_id, batch_ids[:8], allowed=frozenset({200, 503})) as poller:
            task = asyncio.create_task(kill_and_restart())
            try:
                sent_s = await send(chaos.settings, stream.records, RATE)
            finally:
                await task
            seen, catch_up = await settle_offsets(http, pipeline_id, batch_ids, stream.expected, 90)
    outage = [(t, s) for t, s in poller.timeline if t > fault["killed"]]
    first_503 = next((t - fault["killed"] for t, s in outage if s == 503), None)
    last_bad = max((t for t, s in outage if s != 200), default=fault["back"])
    lost = lost_updates(stream.expected, seen)
    report("Redis SIGKILLed, restarted 4 s later",
           stream=stream.describe(), sent_in=f"{sent_s:.1f}s",
           redis_ready_again_after_restart=f"{fault['back'] - fault['restart']:.1f}s",
           first_503_after_kill=f"{first_503:.2f}s" if first_503 is not None else "none",
           GETs_all_200_again=f"{max(0.0, last_bad - fault['back']):.2f}s after Redis was ready",
           burst_before=_count(bursts["before"]), burst_2s_after=_count(bursts.get("after", [])),
           all_offsets_visible_after_stream_end=f"{catch_up:.1f}s",
           lost_updates=f"{len(lost)} of {len(stream.expected)} series", poll=poller.describe())
    assert chaos.pid("api") == api_pid, "the API process was restarted"
    assert poller.slowest < HANG_S, f"a GET took {poller.slowest:.1f}s during the outage"
    assert not poller.bad, f"answers other than 200/503 JSON: {poller.bad[:5]}"
    assert bursts.get("after") == [200] * BURST, f"burst 2 s after: {_count(bursts.get('after', []))}"
    assert not lost, f"{len(lost)} series lost acknowledged updates: {lost[:10]}"
    assert not poller.regressions, poller.regressions[:10]


def _count(statuses: list[int]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for s in statuses:
        counts[s] = counts.get(s, 0) + 1
    return dict(sorted(counts.items()))
