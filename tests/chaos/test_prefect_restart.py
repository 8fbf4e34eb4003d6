"""Scenario 5: the Prefect server SIGKILLed while batches run, then restarted.

Four batches of a throttled pipeline (about half a minute each) are running when the
server dies; it comes back a few seconds later. Every batch must reach `stop` (whatever
its outcome) and none may stay `running`.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.chaos.engine import OUTCOME_OF, batch_of, batches, flow_runs, register, state_type
from tests.chaos.stackctl import ChaosStack
from tests.chaos.watch import report

BATCHES = 4
DOWN_S = 3.0
SETTLE_S = 150.0


@pytest.mark.timeout(300)
async def test_prefect_killed_during_runs(chaos: ChaosStack, http: httpx.AsyncClient) -> None:
    pipeline_id = await register(http, chaos, "chaos-prefect",
                                 {"rows": 80, "partitions": 1, "throttle": 8})
    ids = []
    for _ in range(BATCHES):
        r = await http.post(f"/api/v1/batches/{pipeline_id}")
        assert r.status_code == 200, r.text
        ids.append(r.json()["item"])

    async def states() -> dict[str, str]:
        listed = await batches(http, pipeline_id)
        return {b: listed.get(b, {}).get("state", {}).get("state", "?") for b in ids}

    t0 = time.monotonic()
    while set((await states()).values()) != {"running"}:
        assert time.monotonic() - t0 < 90, f"batches never all running: {await states()}"
        await asyncio.sleep(0.5)
    killed = await asyncio.to_thread(chaos.kill, "prefect")
    await asyncio.sleep(DOWN_S)
    restart = time.monotonic()
    await asyncio.to_thread(chaos.up, "prefect")
    back = time.monotonic()
    while True:
        now = await states()
        if set(now.values()) == {"stop"} or time.monotonic() - back > SETTLE_S:
            break
        await asyncio.sleep(1)
    all_stop = time.monotonic() - back
    listed = await batches(http, pipeline_id)
    runs = {batch_of(r): state_type(r) for r in await flow_runs(chaos, f"dhub-pipeline:{pipeline_id}")}
    outcomes = {b: listed[b]["outcome"] for b in ids if b in listed}
    disagree = {b: (outcomes.get(b), runs.get(b)) for b in ids
                if now[b] == "stop" and OUTCOME_OF.get(runs.get(b) or "") != outcomes.get(b)}
    report("Prefect server SIGKILLed during running batches, restarted",
           batches=f"{BATCHES}, all running when the server was killed",
           down=f"{restart - killed:.1f}s, then ready again after {back - restart:.1f}s",
           all_stop_after_restart=f"{all_stop:.1f}s" if set(now.values()) == {"stop"} else "no",
           final_states=now, outcomes=outcomes, prefect_final_states=runs,
           outcome_disagrees_with_prefect=disagree)
    assert set(now.values()) == {"stop"}, f"not stopped {SETTLE_S:.0f}s after the restart: {now}"
    assert not disagree, f"outcome vs Prefect: {disagree}"
