"""Scenario 7: the same event stream delivered twice, shuffled, ends where in order ends.

Each of 40 pairs of batches gets one life story (scheduled, running, steps with offsets,
re-sent records, a final state): batch A in order, once; batch B all of it twice, each
time shuffled, with the same event ids. Every B must end equal to its A, and every A as
the story says.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from tests.chaos.stackctl import ChaosStack
from tests.chaos.streams import open_producer, seed_batches
from tests.chaos.watch import report

PAIRS = 40
STEPS = ("extract", "transform", "load")
ENDINGS = [("completed", None), ("failed", "step transform failed"), ("cancelled", "stopped")]


def story(rng: random.Random) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One batch's events (without batch_id/pipeline_id) and the state they must leave."""
    flow_run_id = str(uuid.uuid4())
    outcome, reason = rng.choice(ENDINGS)
    events: list[dict[str, Any]] = [
        {"type": "batch.state", "state": "scheduled", "flow_run_id": flow_run_id},
        {"type": "batch.state", "state": "running", "flow_run_id": flow_run_id},
    ]
    steps: dict[str, dict[str, Any]] = {}
    for step in STEPS:
        final = "failed" if outcome == "failed" and step == "transform" else "success"
        if outcome == "cancelled" and step == "load":
            final = "running"
        events.append({"type": "step.state", "step": step, "state": "running"})
        offsets: dict[str, int] = {}
        for n in range(rng.randint(5, 15)):
            part = f"partition_{n % 3}"
            offsets[part] = offsets.get(part, 0) + rng.randint(1, 50)
            events.append({"type": "step.offsets", "step": step, "offsets": {part: offsets[part]}})
            if rng.random() < 0.3:  # an older value re-sent under a new id
                events.append({"type": "step.offsets", "step": step,
                               "offsets": {part: rng.randint(0, offsets[part])}})
        if final != "running":
            events.append({"type": "step.state", "step": step, "state": final})
        # Left running by a cancel: its process is gone, so GET shows it failed.
        steps[step] = {"state": "failed" if final == "running" else final, "offsets": offsets}
    stop = {"type": "batch.state", "state": "stop", "outcome": outcome, "flow_run_id": flow_run_id}
    if reason:
        stop["reason"] = reason
    events.append(stop)
    for e in events:
        e["event_id"] = uuid.uuid4().hex
    # A few records re-sent as they were, in order too (a producer's retry).
    events += [dict(e) for e in rng.sample(events, 5)]
    expected = {"state": "stop", "outcome": outcome, "reason": reason, "flow_run_id": flow_run_id,
                "steps": steps}
    return events, expected


def record(pipeline_id: str, batch_id: str, e: dict[str, Any]) -> tuple[str, bytes]:
    body = {"schema": 1, "batch_id": batch_id, "pipeline_id": pipeline_id, "ts": time.time(), **e}
    return batch_id, orjson.dumps(body)


def comparable(body: dict[str, Any]) -> dict[str, Any]:
    """What the events decide: the state, steps, offsets, outcome, reason and flow run."""
    return {"state": body["state"]["state"], "outcome": body["outcome"], "reason": body["reason"],
            "flow_run_id": body["flow_run_id"],
            "steps": {s: {"state": e["state"], "offsets": e["offsets"]}
                      for s, e in body["state"]["steps"].items()}}


@pytest.mark.timeout(120)
async def test_shuffled_twice_equals_in_order(chaos: ChaosStack, chaos_redis: Redis,
                                              http: httpx.AsyncClient) -> None:
    rng = random.Random(11)
    pipeline_id, ids = await seed_batches(chaos_redis, chaos.settings, "chaos-replay", 2 * PAIRS,
                                          STEPS)
    in_order, shuffled = ids[:PAIRS], ids[PAIRS:]
    stories = [story(rng) for _ in range(PAIRS)]
    ordered_records = [record(pipeline_id, a, e)
                       for a, (events, _) in zip(in_order, stories, strict=True) for e in events]
    replayed: list[tuple[str, bytes]] = []
    for _ in range(2):
        once = [record(pipeline_id, b, e)
                for b, (events, _) in zip(shuffled, stories, strict=True) for e in events]
        rng.shuffle(once)
        replayed += once
    producer = await open_producer(chaos.settings)
    try:
        for key, value in [*ordered_records, *replayed]:
            await producer.send(chaos.settings.topic_events, value, key=key.encode())
        await producer.flush()
    finally:
        await producer.stop()

    async def read(batch_id: str) -> dict[str, Any]:
        response = await http.get(f"/api/v1/batches/{pipeline_id}/{batch_id}")
        response.raise_for_status()
        return comparable(response.json())

    t0 = time.monotonic()
    while True:
        a = [await read(b) for b in in_order]
        b = [await read(b) for b in shuffled]
        expected = [exp for _, exp in stories]
        if (a == expected and b == a) or time.monotonic() - t0 > 30:
            break
        await asyncio.sleep(0.5)
    wrong_a = [i for i in range(PAIRS) if a[i] != expected[i]]
    differ = [i for i in range(PAIRS) if b[i] != a[i]]
    report("one stream in order vs the same stream twice, shuffled",
           batches=f"{PAIRS} pairs, {len(STEPS)} steps each",
           records=f"{len(ordered_records):,} in order, {len(replayed):,} shuffled (2 x)",
           settled_in=f"{time.monotonic() - t0:.1f}s",
           in_order_batches_wrong=len(wrong_a), shuffled_batches_differing=len(differ))
    assert not wrong_a, f"in order, {len(wrong_a)} batches are not what their events say: " \
                        f"{a[wrong_a[0]]} != {expected[wrong_a[0]]}"
    assert not differ, f"{len(differ)} shuffled batches differ: {b[differ[0]]} != {a[differ[0]]}"
