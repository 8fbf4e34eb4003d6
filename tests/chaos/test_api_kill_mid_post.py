"""Scenario 10: the API process SIGKILLed while POSTs with Idempotency-Keys are in flight,
then started again.

Six clients POST back to back, a key of their own per batch. Each retries its request with
the same key, as a client of the contract does, until it is answered: after a broken
connection, a refused one while the API is down, a 503, or a 409 `in_progress` (a killed
attempt holds its key for its lease, 60 s). The API is SIGKILLed once a few POSTs were
answered; the clients then start no new POST but see their requests through.

Then every key must have been answered with one batch id, the pipeline must hold exactly the
batches the keys answered (a killed attempt's batch is its retry's, not a second one), and
every batch must reach `stop` completed. That includes a batch whose attempt died before it
sent the run command: its retry sends it.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest

from tests.chaos.engine import batches, register
from tests.chaos.stackctl import ChaosStack
from tests.chaos.watch import report

CLIENTS = 6
KILL_AFTER = 6  # POSTs answered before the kill
ANSWER_S = 150.0  # a retry waits out the killed attempt's 60 s lease, then takes it over
SETTLE_S = 180.0


@pytest.mark.timeout(420)
async def test_api_killed_with_posts_in_flight(chaos: ChaosStack, http: httpx.AsyncClient) -> None:
    pipeline_id = await register(http, chaos, "chaos-post", {"rows": 40, "partitions": 1})
    answered: dict[str, str] = {}  # key -> batch id
    broken: list[str] = []  # keys whose request was cut or refused at least once
    statuses: dict[int, int] = {}
    stop_starting = asyncio.Event()

    async def post(key: str) -> None:
        deadline = time.monotonic() + ANSWER_S
        while True:
            try:
                r = await http.post(f"/api/v1/batches/{pipeline_id}",
                                    headers={"Idempotency-Key": key})
            except httpx.TransportError:
                broken.append(key)
            else:
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    answered[key] = r.json()["item"]
                    return
                assert r.status_code in (409, 503), f"POST {key}: {r.status_code} {r.text}"
                assert r.status_code == 503 or r.json()["error"]["code"] == "in_progress", r.text
            assert time.monotonic() < deadline, f"POST {key} unanswered after {ANSWER_S:.0f}s"
            await asyncio.sleep(0.5)

    async def client() -> None:
        while not stop_starting.is_set():
            await post(f"chaos-{uuid.uuid4().hex}")

    clients = [asyncio.create_task(client()) for _ in range(CLIENTS)]
    t0 = time.monotonic()
    while len(answered) < KILL_AFTER:
        assert time.monotonic() - t0 < 60, f"only {len(answered)} POSTs answered in 60s"
        for task in clients:
            if task.done():
                task.result()
        await asyncio.sleep(0.005)
    killed = await asyncio.to_thread(chaos.kill, "api")
    stop_starting.set()
    await asyncio.to_thread(chaos.up, "api")
    back = time.monotonic() - killed
    await asyncio.gather(*clients)
    all_answered = time.monotonic() - killed

    ids = set(answered.values())
    t1 = time.monotonic()
    while True:
        listed = await batches(http, pipeline_id)
        states = {b: listed.get(b, {}).get("state", {}).get("state", "?") for b in ids}
        if set(states.values()) == {"stop"} or time.monotonic() - t1 > SETTLE_S:
            break
        await asyncio.sleep(1)
    outcomes = {b: listed[b].get("outcome") for b in ids if b in listed}
    report("API SIGKILLed with POSTs (Idempotency-Key) in flight, started again",
           posts=f"{len(answered)} keys answered, {len(set(broken))} of them after a cut or "
                 f"refused request ({CLIENTS} clients, each with a request out at the kill)",
           api_back_after=f"{back:.1f}s", every_key_answered_after=f"{all_answered:.1f}s",
           statuses=statuses, batches_listed=len(listed),
           all_stop_after=f"{time.monotonic() - t1:.1f}s", outcomes=sorted({str(o) for o in outcomes.values()}))
    assert len(ids) == len(answered), "two keys were answered with the same batch"
    assert set(listed) == ids, (f"batches no key answered: {set(listed) - ids}; "
                                f"answered but not listed: {ids - set(listed)}")
    assert set(states.values()) == {"stop"}, f"not stopped after {SETTLE_S:.0f}s: {states}"
    assert set(outcomes.values()) == {"completed"}, outcomes
    assert broken, "no request was in flight when the API died: the scenario tested nothing"
