"""Scenario 4: the Kafka broker SIGKILLed during a stream of POSTs.

A POST every 0.5 s, every other one stopped right after its 200. Every answer must be 200
or 503 JSON, and within 1 s once the outage is known (from the first 503 until the
restarted broker is ready). In the end:
every 200 ran exactly once in Prefect (one flow run, run once, final); every 503 left no
batch and no flow run; every batch's outcome agrees with its flow run's final state.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx
import pytest

from tests.chaos.engine import OUTCOME_OF, batch_of, batches, flow_runs, register, state_type
from tests.chaos.stackctl import ChaosStack
from tests.chaos.watch import is_json, report

EVERY_S = 0.5
BEFORE_S = 4.0  # posting before the kill
DOWN_S = 6.0  # broker down before its restart begins
AFTER_S = 4.0  # posting once the broker is back
KNOWN_LIMIT_S = 1.0


@dataclass
class Post:
    started: float
    ended: float = 0.0
    status: int = 0  # 0: no answer (transport error or client timeout)
    json: bool = False
    batch_id: str | None = None
    stop_status: int | None = None  # the PUT stop sent right after a 200, if any


@pytest.mark.timeout(300)
async def test_kafka_killed_during_posts(chaos: ChaosStack, http: httpx.AsyncClient) -> None:
    pipeline_id = await register(http, chaos, "chaos-kafka", {"rows": 40, "partitions": 1})
    posts: list[Post] = []
    fault: dict[str, float] = {}

    async def post(n: int) -> None:
        p = Post(time.monotonic())
        posts.append(p)
        try:
            r = await http.post(f"/api/v1/batches/{pipeline_id}", timeout=15)
            p.status, p.json = r.status_code, is_json(r)
            if r.status_code == 200:
                p.batch_id = r.json()["item"]
        except httpx.HTTPError:
            pass
        p.ended = time.monotonic()
        if p.batch_id and n % 2 == 0:
            try:
                r = await http.put(f"/api/v1/batches/{pipeline_id}/{p.batch_id}/stop", timeout=15)
                p.stop_status = r.status_code
            except httpx.HTTPError:
                p.stop_status = 0

    async def stream(until: asyncio.Event) -> None:
        tasks, n = [], 0
        while not until.is_set():
            tasks.append(asyncio.create_task(post(n)))
            n += 1
            await asyncio.sleep(EVERY_S)
        await asyncio.gather(*tasks)

    done = asyncio.Event()
    posting = asyncio.create_task(stream(done))
    try:
        await asyncio.sleep(BEFORE_S)
        fault["killed"] = await asyncio.to_thread(chaos.kill, "kafka")
        await asyncio.sleep(DOWN_S)
        fault["restart"] = time.monotonic()
        await asyncio.to_thread(chaos.up, "kafka")
        fault["back"] = time.monotonic()
        await asyncio.sleep(AFTER_S)
    finally:
        done.set()
        await posting

    ok = {p.batch_id: p for p in posts if p.status == 200 and p.batch_id}
    stopped = {b for b, p in ok.items() if p.stop_status == 200}
    first_503 = min((p.ended for p in posts if p.status == 503 and p.ended > fault["killed"]),
                    default=None)
    known_window = [p for p in posts if first_503 is not None
                    and first_503 <= p.started < fault["back"]]
    slow = [round(p.ended - p.started, 2) for p in known_window
            if p.ended - p.started > KNOWN_LIMIT_S]
    wrong = [(p.status, p.json) for p in posts if p.status not in (200, 503) or not p.json]

    # The engine's side, once every accepted batch has stopped.
    t0 = time.monotonic()
    while True:
        listed = await batches(http, pipeline_id)
        if all(listed.get(b, {}).get("state", {}).get("state") == "stop" for b in ok) \
                or time.monotonic() - t0 > 150:
            break
        await asyncio.sleep(2)
    runs = await flow_runs(chaos, f"dhub-pipeline:{pipeline_id}")
    runs_of: dict[str, list[dict[str, object]]] = {}
    for run in runs:
        runs_of.setdefault(batch_of(run) or "?", []).append(run)
    not_stopped = [b for b in ok if listed.get(b, {}).get("state", {}).get("state") != "stop"]
    disagree: list[str] = []
    ghosts_listed = sorted(set(listed) - set(ok))
    # Ran exactly once: one flow run, executed once, final. Whether it completed is a figure:
    # a run that starts while the broker is down may fail (its outcome must then say so).
    not_once = [b for b in set(ok) - stopped
                if len(runs_of.get(b, [])) != 1 or state_type(runs_of[b][0]) not in OUTCOME_OF
                or runs_of[b][0].get("run_count") != 1]
    not_completed = {b: state_type(runs_of[b][0]) for b in set(ok) - stopped - set(not_once)
                     if state_type(runs_of[b][0]) != "COMPLETED"}
    for b in set(ok) - stopped - set(not_once):
        if listed.get(b, {}).get("outcome") != OUTCOME_OF[state_type(runs_of[b][0]) or ""]:
            disagree.append(f"{b}: batch says {listed.get(b, {}).get('outcome')}, "
                            f"Prefect {state_type(runs_of[b][0])}")
    ghost_runs = sorted(set(runs_of) - set(ok))
    for b in stopped:
        outcome = listed.get(b, {}).get("outcome")
        finals = [state_type(r) for r in runs_of.get(b, [])]
        # No run at all: the stop overtook the run command, nothing ran. A run still not
        # final (CANCELLING for ever, say) agrees with nothing.
        engine = OUTCOME_OF.get(finals[0] or "") if len(finals) == 1 else ("cancelled" if not finals else None)
        if engine is None or outcome != engine:
            disagree.append(f"{b}: batch says {outcome}, Prefect {finals}")
    statuses: dict[int, int] = {}
    for p in posts:
        statuses[p.status] = statuses.get(p.status, 0) + 1
    report("Kafka broker SIGKILLed during a stream of POSTs",
           posts=f"{len(posts)} ({statuses}), {len(stopped)} stopped right after their 200",
           broker_ready_again_after_restart=f"{fault['back'] - fault['restart']:.1f}s",
           first_503_after_kill=f"{first_503 - fault['killed']:.2f}s" if first_503 else "none",
           answers_once_outage_known=f"{len(known_window)}, slowest "
           f"{max((p.ended - p.started for p in known_window), default=0):.2f}s, over 1 s: {len(slow)}",
           not_200_or_503_json=len(wrong), accepted_not_stopped_after_150s=len(not_stopped),
           accepted_not_run_exactly_once=len(not_once),
           accepted_not_stopped_that_did_not_complete=not_completed or 0,
           batches_or_runs_left_by_a_503=f"{len(ghosts_listed)} batches, {len(ghost_runs)} flow runs",
           outcome_disagrees_with_prefect=len(disagree))
    assert first_503 is not None, "no POST answered 503 while the broker was down"
    assert not wrong, f"answers other than 200/503 JSON: {wrong[:5]}"
    assert not slow, f"answers slower than {KNOWN_LIMIT_S}s once the outage was known: {slow}"
    assert not not_stopped, f"accepted batches that never stopped: {not_stopped[:5]}"
    assert not not_once, f"accepted batches not run exactly once: {not_once[:5]}"
    assert not ghosts_listed and not ghost_runs, \
        f"a 503 left batches {ghosts_listed[:5]} / flow runs of {ghost_runs[:5]}"
    assert not disagree, disagree[:5]
