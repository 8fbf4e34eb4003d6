"""A worker whose clock runs more than a day ahead (tests/test_bridge_truth.py's
`test_a_state_stamped_out_of_range_still_reaches_the_batch` covers the same run's Prefect
states). Every event the run's own flow and step SDK publish carries the worker's `ts`, and
the events consumer's decode refused a `ts` more than a day ahead of its own clock: the
step's offsets were dead-lettered, and GET showed a completed batch whose step was `success`
with no offsets, for good. A decode now takes such a time as a guess (ts 0,
`core.messages.clock_guesses`)."""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio import Redis

from consumers.events import EventsConsumer
from core.prefect_events import translate
from core.settings import Settings
from core.store import BatchStore
from pipelines.publisher import EventPublisher, start_producer
from tests.conftest import eventually
from tests.test_bridge_truth import captured
from tests.test_consumers_support import (
    committed,
    make_spec,
    new_batch,
    options,
    running,
    store_for,
    unique,
)
from tests.test_events_faults import dead_letters

AHEAD_S = 2 * 86_400.0  # the worker's clock: two days ahead


def prefect_event(name: str, pipeline_id: str, batch_id: str, entered: str) -> dict[str, Any]:
    event = captured(name, batch_id, pipeline_id)
    event["resource"]["prefect.state-timestamp"] = entered
    event["occurred"] = entered
    return event


async def test_a_steps_offsets_from_a_worker_whose_clock_runs_ahead_are_not_lost(
        topics: Settings, redis: Redis) -> None:
    pipeline_id = unique("clock")
    batch_id = await new_batch(redis, topics, pipeline_id, make_spec(pipeline_id))
    store: BatchStore = store_for(redis, topics)
    sent = 0
    async with running(EventsConsumer(topics, options())):
        # What the run's flow and step SDK publish (pipelines.publisher: each event stamped
        # with the worker's clock, two days ahead), built synchronously under that clock.
        real = time.time
        publisher = EventPublisher(None, topics.topic_events, batch_id,  # type: ignore[arg-type]
                                   pipeline_id)
        time.time = lambda: real() + AHEAD_S
        try:
            own = [publisher._event("batch.state", state="running"),
                   publisher._event("step.state", step="extract", state="running"),
                   publisher._event("step.offsets", step="extract",
                                    offsets={"p0": 500, "p1": 300},
                                    totals={"p0": 500, "p1": 300}),
                   publisher._event("step.state", step="extract", state="success")]
        finally:
            time.time = real
        producer = await start_producer(topics)
        try:
            for e in own:
                await producer.send_and_wait(topics.topic_events, e.encode(),
                                             key=e.batch_id.encode())
                sent += 1
        finally:
            await producer.stop()
        # Prefect's states of the same run, stamped by the same clock, as the bridge (or the
        # webhook) translates them on a host with the right time.
        entered = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(real() + AHEAD_S))
        bridged = [*translate(prefect_event("task_run_completed", pipeline_id, batch_id,
                                            entered)),
                   *translate(prefect_event("flow_run_completed", pipeline_id, batch_id,
                                            entered))]
        producer = await start_producer(topics)
        try:
            for e in bridged:
                await producer.send_and_wait(topics.topic_events, e.encode(),
                                             key=e.batch_id.encode())
                sent += 1
        finally:
            await producer.stop()

        async def all_committed() -> bool:
            return await committed(topics, topics.group_events, topics.topic_events) >= sent
        await eventually(all_committed, timeout=30, interval=0.1)

    batch = await store.get(pipeline_id, batch_id)
    assert batch is not None
    extract = batch["state"]["steps"]["extract"]
    lost = await dead_letters(topics)
    assert (batch["state"]["state"], batch["outcome"], extract["state"]) == (
        "stop", "completed", "success")
    assert extract["offsets"] == {"p0": 500, "p1": 300}, (
        f"GET shows step extract {extract['state']} with offsets {extract['offsets']}; "
        f"{lost} of the run's own events were dead-lettered")
