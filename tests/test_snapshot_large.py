"""A batch whose snapshot is larger than one Kafka record may be (the broker's
max.message.bytes, 1 MB: some 30,000 offsets) on the real Redis and Kafka: its snapshot goes
compressed and a rebuild reads it back whole; one too large even compressed is skipped,
counted and logged, and the events consumer keeps applying and committing (it used to raise
MessageSizeTooLargeError in every flush, end, restart on the same poll and never commit)."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import cast

import pytest
from aiokafka.structs import ConsumerRecord
from prometheus_client import generate_latest
from redis.asyncio import Redis

from consumers.events import EventsConsumer
from consumers.plumbing.metrics import ConsumersCollector, registry_for
from consumers.plumbing.snapshot_batch import SnapshotBatches
from core import keys, snapshots
from core.codec import Event
from core.connections import open_producer
from core.settings import Settings
from core.snapshots import NOT_SNAPSHOTTED, Snapshot, SnapshotWriter, snapshot_key
from tests.conftest import eventually
from tests.helpers import read_topic
from tests.test_consumers_support import (
    committed,
    make_spec,
    new_batch,
    options,
    running,
    store_for,
    unique,
)

PARTITIONS = 40_000  # ~1.4 MB of JSON a snapshot


async def _giant(redis: Redis, settings: Settings, pipeline_id: str) -> str:
    batch_id = await new_batch(redis, settings, pipeline_id, make_spec(pipeline_id))
    store = store_for(redis, settings)
    per_event = 2_000
    await store.apply([
        Event(type="step.offsets", batch_id=batch_id, pipeline_id=pipeline_id, step="extract",
              offsets={f"part-{n:06d}": n * 7919 for n in range(start, start + per_event)})
        for start in range(0, PARTITIONS, per_event)])
    return batch_id


def _kept(fields: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in fields.items() if k not in NOT_SNAPSHOTTED}


async def _latest(settings: Settings, wanted: set[bytes]) -> dict[bytes, Snapshot]:
    def enough(records: list[ConsumerRecord[bytes, bytes]]) -> bool:
        return wanted <= {r.key for r in records}
    records = await read_topic(settings, settings.topic_snapshots, enough)
    return {r.key: Snapshot.decode(r.value) for r in records if r.key in wanted}


@pytest.mark.parametrize("writer", ["batches", "writer"])
async def test_a_snapshot_over_a_record_goes_compressed_and_decodes_whole(
        topics: Settings, redis: Redis, writer: str) -> None:
    pipeline_id = unique("p-giant")
    giant = await _giant(redis, topics, pipeline_id)
    small = await new_batch(redis, topics, pipeline_id, make_spec(pipeline_id))
    fields = cast(dict[str, str], await redis.hgetall(keys.batch(pipeline_id, giant)))
    assert len(snapshots.snapshot_record(pipeline_id, giant, fields)) > 1 << 20
    producer = await open_producer(topics)
    try:
        chosen = (SnapshotBatches if writer == "batches" else SnapshotWriter)(
            producer, redis, topics.topic_snapshots)
        assert await chosen.write_current([(pipeline_id, giant), (pipeline_id, small)]) == 2
    finally:
        await producer.stop()
    got = await _latest(topics, {snapshot_key(pipeline_id, b) for b in (giant, small)})
    assert got[snapshot_key(pipeline_id, giant)].fields == _kept(fields)
    assert len(got[snapshot_key(pipeline_id, giant)].fields) > PARTITIONS
    assert got[snapshot_key(pipeline_id, small)].batch_id == small


async def test_a_snapshot_too_large_even_compressed_is_skipped_counted_and_logged(
        topics: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    pipeline_id = unique("p-giant")
    giant = await _giant(redis, topics, pipeline_id)
    small = await new_batch(redis, topics, pipeline_id, make_spec(pipeline_id))
    # Compressed, the giant is ~400 KB: a limit below that, above the small batch's record.
    monkeypatch.setattr(snapshots, "RECORD_LIMIT", 100_000)
    producer = await open_producer(topics)
    try:
        batches = SnapshotBatches(producer, redis, topics.topic_snapshots)
        with caplog.at_level(logging.ERROR):
            assert await batches.write_current([(pipeline_id, giant), (pipeline_id, small)]) == 1
        assert batches.too_large == 1
        # ... and the consumers' /metrics reports it, by part.
        part = SimpleNamespace(name="retention", snapshots=batches)
        text = generate_latest(registry_for(ConsumersCollector([part]))).decode()  # type: ignore[list-item]
        assert 'dhub_snapshots_too_large_total{part="retention"} 1.0' in text
        assert any(giant in r.getMessage() and "too large" in r.getMessage()
                   for r in caplog.records)
    finally:
        await producer.stop()
    got = await _latest(topics, {snapshot_key(pipeline_id, small)})
    assert got[snapshot_key(pipeline_id, small)].batch_id == small


async def test_the_events_consumer_commits_past_a_giant_batch(topics: Settings,
                                                              redis: Redis) -> None:
    pipeline_id = unique("p-giant")
    giant = await _giant(redis, topics, pipeline_id)
    consumer = EventsConsumer(topics, options())
    producer = await open_producer(topics)
    try:
        async with running(consumer):
            for n in (1, 2):
                await producer.send_and_wait(topics.topic_events, Event(
                    type="step.offsets", batch_id=giant, pipeline_id=pipeline_id,
                    step="transform", offsets={"p0": n}).encode(), key=giant.encode())

            async def both_committed() -> bool:
                return await committed(topics, topics.group_events, topics.topic_events) == 2
            await eventually(both_committed, timeout=30)
    finally:
        await producer.stop()
    got = await _latest(topics, {snapshot_key(pipeline_id, giant)})
    assert got[snapshot_key(pipeline_id, giant)].fields["off:transform:p0"] == "2"
