"""The consumers' `/metrics`, scraped and parsed with prometheus-client's own parser."""

from __future__ import annotations

import orjson
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from consumers.events import EventsConsumer
from consumers.plumbing.metrics import Latencies, app_for
from core.codec import Event
from core.settings import Settings
from tests.conftest import eventually
from tests.test_consumers_support import (
    committed,
    make_spec,
    new_batch,
    options,
    running,
    send,
    unique,
)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample by name and labels; also checks that every name starts with dhub_."""
    found = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("dhub_"), family.name
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


async def test_events_dead_letters_and_lag_are_scraped(topics: Settings, redis: Redis) -> None:
    pipeline_id = unique("test-metrics")
    batch_id = await new_batch(redis, topics, pipeline_id, make_spec(pipeline_id))
    consumer = EventsConsumer(topics, options())
    async with running(consumer), TestClient(TestServer(app_for([consumer]))) as client:
        await send(topics, topics.topic_events, batch_id, b"not json")
        await send(topics, topics.topic_events, batch_id, orjson.dumps({"schema": 1}))
        running_event = Event(type="batch.state", batch_id=batch_id, pipeline_id=pipeline_id,
                              state="running")
        gone = Event(type="batch.state", batch_id="batch-never-created", pipeline_id=pipeline_id,
                     state="running")
        for e in (running_event, running_event, gone):
            await send(topics, topics.topic_events, e.batch_id, e.encode())

        async def scraped() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            response = await client.get("/metrics")
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            return samples(await response.text())

        async def all_in() -> bool:
            return await committed(topics, topics.group_events, topics.topic_events) >= 5
        await eventually(all_in, timeout=20)
        found = await scraped()
    assert found[("dhub_events_applied_total", ())] == 3
    assert found[("dhub_events_changed_total", ())] >= 1
    assert found[("dhub_events_dropped_total", ())] == 1
    assert found[("dhub_dead_letters_sent_total",
                  (("kind", "malformed"), ("part", "events")))] == 2
    lags = {labels: v for (name, labels), v in found.items() if name == "dhub_consumer_lag"}
    assert lags, found  # every record of the fetched partitions was read: no lag left
    assert all(dict(labels)["topic"] == topics.topic_events and dict(labels)["part"] == "events"
               and v == 0 for labels, v in lags.items())


def test_latencies_fall_into_cumulative_buckets() -> None:
    latencies = Latencies()
    for seconds in (0.003, 0.04, 0.04, 20.0):
        latencies.observe("read", seconds)
    count, total, *buckets = latencies.series["read"]
    assert (count, round(total, 3)) == (4, 20.083)
    assert sum(buckets) == 4 and buckets[0] == 1 and buckets[-2] == 1
