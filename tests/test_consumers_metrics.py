"""The consumers' `/metrics`, scraped and parsed with prometheus-client's own parser."""

from __future__ import annotations

import asyncio

import orjson
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from consumers.commands import CommandsConsumer
from consumers.events import EventsConsumer
from consumers.plumbing.metrics import ConsumersCollector, Latencies, app_for
from core.codec import Command, Event
from core.models import new_batch_id
from core.settings import Settings
from tests.conftest import eventually
from tests.test_consumers_support import (
    committed,
    make_spec,
    new_batch,
    options,
    running,
    send,
    send_command,
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
        progress = Event("step.offsets", batch_id, pipeline_id, step="load",
                         offsets={"p0": 3})  # read by the scanner (core.offsets_scan)
        for e in (running_event, running_event, gone, progress):
            await send(topics, topics.topic_events, e.batch_id, e.encode())

        async def scraped() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            response = await client.get("/metrics")
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            return samples(await response.text())

        async def all_in() -> bool:
            return await committed(topics, topics.group_events, topics.topic_events) >= 6
        await eventually(all_in, timeout=20)
        found = await scraped()
    assert found[("dhub_events_applied_total", ())] == 4
    assert found[("dhub_events_scanned_total", ())] == 1
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


async def test_commands_lag_counts_the_commands_queued_behind_a_stuck_lane(
        topics: Settings) -> None:
    """A lane stuck on one command keeps its partition paused (never fetched, so the
    client's high watermark stays put): the commands behind it, and the stuck one, are lag."""
    batch_id = new_batch_id()
    consumer = CommandsConsumer(topics, options())
    gate, entered = asyncio.Event(), asyncio.Event()

    async def stuck(command: Command) -> None:
        entered.set()
        await gate.wait()

    consumer.apply = stuck  # type: ignore[method-assign]
    tp = TopicPartition(topics.topic_commands,
                        DefaultPartitioner()(batch_id.encode(), [0, 1], [0, 1]))
    async with running(consumer):
        collector = ConsumersCollector([consumer])
        await send_command(topics, "run", "test-lag", batch_id)
        await asyncio.wait_for(entered.wait(), 30)
        for _ in range(20):
            await send_command(topics, "stop", "test-lag", batch_id)

        async def lag_shows_them() -> bool:
            await collector.refresh()
            return collector.lag.get(("commands", tp.topic, tp.partition)) == 21
        try:
            await eventually(lag_shows_them, timeout=8, interval=0.2)
        finally:
            gate.set()  # the stuck command ends, so the stop does not wait it out
