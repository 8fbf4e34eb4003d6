"""Scenario 8: 300 live batches; the reconciler keeps working; no orphan flow run remains.

The worker is stopped first, so the 300 flow runs wait in the work pool (SCHEDULED) — live
for the reconciler, without 300 processes on a small machine. Then:
- 10 batches lose their `scheduled` state in Redis (as if the event never came): the
  reconciler must restore it from Prefect, which takes a round over all 300;
- 5 batches vanish from Redis while their runs wait (a lost batch): the orphan sweep must
  end those runs;
- the other 285 are deleted through the API.
At the end no flow run of the pipeline may be left in a non-final state.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from redis.asyncio import Redis

from core import keys
from tests.chaos.engine import FINAL, batch_of, batches, cancel_all, flow_runs, register, state_type
from tests.chaos.stackctl import ChaosStack
from tests.chaos.watch import report

LIVE = 300
MISSED = 10
VANISHED = 5


async def gather_limited(n: int, calls: list[object]) -> list[object]:
    gate = asyncio.Semaphore(n)

    async def one(call: object) -> object:
        async with gate:
            return await call  # type: ignore[misc]

    return list(await asyncio.gather(*(one(c) for c in calls)))


@pytest.mark.timeout(720)
async def test_three_hundred_live_batches(chaos: ChaosStack, chaos_redis: Redis,
                                          http: httpx.AsyncClient) -> None:
    pipeline_id = await register(http, chaos, "chaos-many", {"rows": 10, "partitions": 1})
    tag = f"dhub-pipeline:{pipeline_id}"
    chaos.down("worker")
    try:
        t0 = time.monotonic()
        answers = await gather_limited(20, [http.post(f"/api/v1/batches/{pipeline_id}")
                                            for _ in range(LIVE)])
        ids = [r.json()["item"] for r in answers if r.status_code == 200]  # type: ignore[attr-defined]
        assert len(ids) == LIVE, f"only {len(ids)} of {LIVE} POSTs answered 200"
        posted = time.monotonic() - t0
        while True:
            listed = await batches(http, pipeline_id)
            scheduled = [b for b in ids if listed.get(b, {}).get("flow_run_id")
                         and listed[b]["state"]["state"] == "scheduled"]
            if len(scheduled) == LIVE or time.monotonic() - t0 > 360:
                break
            await asyncio.sleep(2)
        all_scheduled = time.monotonic() - t0
        assert len(scheduled) == LIVE, f"{len(scheduled)} of {LIVE} batches got a waiting run"

        # A lost `scheduled` event on every 30th batch: only the reconciler can repair it.
        missed = ids[::LIVE // MISSED][:MISSED]
        for b in missed:  # as if the event never came: its id is not remembered either
            await chaos_redis.hset(keys.batch(pipeline_id, b), "state", "pending")
            await chaos_redis.delete(keys.batch_seen(pipeline_id, b))
        t1 = time.monotonic()
        while True:
            repaired = [b for b in missed
                        if await chaos_redis.hget(keys.batch(pipeline_id, b), "state") == "scheduled"]
            if len(repaired) == MISSED or time.monotonic() - t1 > 45:
                break
            await asyncio.sleep(1)
        repair_s = time.monotonic() - t1

        # Batches lost from Redis while their runs wait, and the rest deleted by the API.
        vanished = [b for b in ids if b not in missed][:VANISHED]
        for b in vanished:
            await chaos_redis.delete(keys.batch(pipeline_id, b))
            await chaos_redis.zrem(keys.batch_index(pipeline_id), b)
        rest = [b for b in ids if b not in vanished]
        t2 = time.monotonic()
        deletes = await gather_limited(20, [http.delete(f"/api/v1/batches/{pipeline_id}/{b}")
                                            for b in rest])
        refused = [r.status_code for r in deletes if r.status_code != 200]  # type: ignore[attr-defined]
        while True:
            runs = await flow_runs(chaos, tag)
            live = [r for r in runs if state_type(r) not in FINAL]
            if not live or time.monotonic() - t2 > 120:
                break
            await asyncio.sleep(2)
        cleanup_s = time.monotonic() - t2
        left_listed = await batches(http, pipeline_id)
    finally:
        # Whatever failed, the worker must not come back to 300 waiting runs.
        await cancel_all(chaos, tag)
        chaos.up("worker")
    orphans_of_vanished = [r for r in live if batch_of(r) in vanished]
    report("300 live batches (runs waiting in the work pool), reconciler and orphan sweep",
           posted=f"{LIVE} POSTs in {posted:.1f}s; all scheduled with a flow run after {all_scheduled:.1f}s",
           missed_states_repaired_by_the_reconciler=f"{len(repaired)} of {MISSED} "
           f"(after {repair_s:.1f}s)",
           deletes=f"{len(rest)} ({len(refused)} refused)",
           flow_runs_left_non_final=f"{len(live)} after {cleanup_s:.1f}s "
           f"({len(orphans_of_vanished)} of the {VANISHED} whose batch vanished)",
           flow_runs_left_in_prefect=len(runs), batches_still_listed=len(left_listed))
    assert len(repaired) == MISSED, f"the reconciler repaired {len(repaired)} of {MISSED}"
    assert not refused, f"DELETE answered {refused[:5]}"
    assert not left_listed, f"{len(left_listed)} deleted batches still listed"
    assert not live, f"{len(live)} orphan flow runs not final: " \
                     f"{[(batch_of(r), state_type(r)) for r in live][:5]}"
