"""Event streams the scenarios send, with the final state each one must leave.

Batches are written straight into the chaos Redis with the project's own store (the API
serves them; no flow run starts), so a scenario about events is not slowed by Prefect.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from redis.asyncio import Redis

from core.models import PipelineSpec, StepSpec, new_batch_id
from core.registry import PipelineRegistry
from core.scripts import Scripts
from core.settings import Settings
from core.store import BatchStore

Series = tuple[str, str, str]  # (batch id, step, partition)


def event(kind: str, pipeline_id: str, batch_id: str, **fields: Any) -> bytes:
    """An event as upstream producers write it (the wire format, built here rather than by
    the codec under test, which may change while the suite runs)."""
    return orjson.dumps({"schema": 1, "type": kind, "event_id": uuid.uuid4().hex,
                         "batch_id": batch_id, "pipeline_id": pipeline_id, "ts": time.time(),
                         **fields})


async def open_producer(settings: Settings) -> AIOKafkaProducer:
    """acks=all: a record counts as sent once the broker has it."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                enable_idempotence=True, linger_ms=5)
    await producer.start()
    return producer


async def seed_batches(redis: Redis, settings: Settings, prefix: str, count: int,
                       steps: tuple[str, ...] = ("extract", "load")) -> tuple[str, list[str]]:
    """A fresh pipeline id and `count` new `pending` batches of it."""
    pipeline_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
    spec = PipelineSpec(name=pipeline_id, version="1",
                        steps=[StepSpec(name=s, uses=f"sales.{s}") for s in steps])
    scripts = Scripts(redis)
    await PipelineRegistry(redis, scripts).register(pipeline_id, spec)
    store = BatchStore.from_settings(redis, settings, scripts)
    batch_ids = [new_batch_id() for _ in range(count)]
    for batch_id in batch_ids:
        await store.create(pipeline_id, batch_id, spec)
    return pipeline_id, batch_ids


@dataclass
class OffsetStream:
    """Offset reports for many (batch, step, partition) series, as a flaky producer sends
    them: every value grows per series, but records are re-sent (same event id) and older
    values arrive again under new ids after newer ones."""

    pipeline_id: str
    batch_ids: list[str]
    steps: tuple[str, ...] = ("extract", "load")
    partitions: int = 4
    seed: int = 7
    records: list[tuple[str, bytes]] = field(default_factory=list)  # (key, value) in send order
    expected: dict[Series, int] = field(default_factory=dict)  # the max sent per series
    unique = 0
    duplicates = 0
    stale = 0

    def build(self, total: int, dup_rate: float = 0.1, stale_rate: float = 0.1) -> OffsetStream:
        rng = random.Random(self.seed)
        series = [(b, s, f"partition_{p}") for b in self.batch_ids for s in self.steps
                  for p in range(self.partitions)]
        history: dict[Series, list[int]] = defaultdict(list)
        recent: list[tuple[str, bytes]] = []
        by_step: dict[tuple[str, str], list[tuple[str, bytes]]] = defaultdict(list)
        while len(self.records) < total:
            key = series[len(self.records) % len(series)]
            batch_id, step, part = key
            roll = rng.random()
            if roll < dup_rate and recent:
                self.records.append(rng.choice(recent))  # the very same record again
                self.duplicates += 1
                continue
            if roll < dup_rate + stale_rate and len(history[key]) > 1:
                value = rng.choice(history[key][:-1])  # an older value, under a new id
                self.stale += 1
            else:
                value = (history[key][-1] if history[key] else 0) + rng.randint(1, 3)
                history[key].append(value)
                self.unique += 1
            record = (batch_id, event("step.offsets", self.pipeline_id, batch_id, step=step,
                                      offsets={part: value}))
            self.records.append(record)
            by_step[(batch_id, step)].append(record)
            recent = [*recent[-499:], record]
            self.expected[key] = max(self.expected.get(key, 0), value)
        # The tail: every series' last new value, each followed closely by an old record of
        # the same step re-sent, so that one poll often holds both (a merge of the two must
        # not lose the new value because the re-sent id was seen before).
        for key in series:
            batch_id, step, part = key
            value = history[key][-1] + 1 if history[key] else 1
            history[key].append(value)
            old = rng.choice(by_step[(batch_id, step)]) if by_step[(batch_id, step)] else None
            self.records.append((batch_id, event("step.offsets", self.pipeline_id, batch_id,
                                                 step=step, offsets={part: value})))
            self.unique += 1
            if old is not None:
                self.records.append(old)
                self.duplicates += 1
            self.expected[key] = value
        return self

    def describe(self) -> str:
        return (f"{len(self.records):,} records to {len(self.batch_ids)} batches "
                f"({len(self.expected)} offset series): {self.unique:,} new values, "
                f"{self.duplicates:,} re-sent duplicates, {self.stale:,} older values re-sent")


async def send(settings: Settings, records: list[tuple[str, bytes]], rate: float,
               producer: AIOKafkaProducer | None = None) -> float:
    """Sends `records` in order at about `rate` per second, each acknowledged by Kafka
    (acks=all) before this returns; returns the seconds it took."""
    own = producer is None
    producer = producer or await open_producer(settings)
    t0 = time.monotonic()
    try:
        chunk = max(1, int(rate / 20))
        for start in range(0, len(records), chunk):
            futures = [await producer.send(settings.topic_events, value, key=key.encode())
                       for key, value in records[start:start + chunk]]
            await asyncio.gather(*futures)
            ahead = (start + chunk) / rate - (time.monotonic() - t0)
            if ahead > 0:
                await asyncio.sleep(ahead)
    finally:
        if own:
            await producer.stop()
    return time.monotonic() - t0


def offsets_of(body: dict[str, object], batch_id: str) -> dict[Series, int]:
    steps = body["state"]["steps"]  # type: ignore[index]
    return {(batch_id, step, part): value
            for step, entry in steps.items() for part, value in entry["offsets"].items()}


async def topic_ends(settings: Settings, topic: str) -> dict[int, int]:
    """The end offset of each partition of `topic` (where the next record will go)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        if not parts:
            parts = [TopicPartition(topic, p) for p in sorted(await _partitions(consumer, topic))]
        ends = await consumer.end_offsets(parts)
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer._client.force_metadata_update()
    return consumer._client.cluster.partitions_for_topic(topic) or set()


async def records_since(settings: Settings, topic: str, since: dict[int, int]) -> list[Any]:
    """Every record of `topic` written after the offsets `since` (from `topic_ends`)."""
    ends = await topic_ends(settings, topic)
    found: list[Any] = []
    wanted = {TopicPartition(topic, p): end for p, end in ends.items() if end > since.get(p, 0)}
    if not wanted:
        return found
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        for tp in wanted:
            consumer.seek(tp, since.get(tp.partition, 0))
        want = sum(end - since.get(tp.partition, 0) for tp, end in wanted.items())
        deadline = time.monotonic() + 20
        while len(found) < want and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                found.extend(batch)
    finally:
        await consumer.stop()
    return found
