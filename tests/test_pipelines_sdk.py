"""The step SDK against the real Kafka: coalesced offsets, step states, failures, hiccups."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError

from core.codec import Event, decode_event
from core.connections import open_producer
from core.settings import Settings
from pipelines.offsets import REPORT_INTERVAL_S
from pipelines.publisher import EventPublisher, PublishError, start_producer
from pipelines.sdk import StepAborted, StepContext, StepFailed, run_step
from tests.conftest import eventually
from tests.write_faults_proxy import KafkaProxy

BATCH = "batch-sdk-test"
PIPELINE = "pipeline-sdk-test"


class EventTail:
    """Reads every partition of an events topic (no consumer group, nothing committed),
    keeping one batch's events in order (they share a partition, keyed by batch id)."""

    def __init__(self, settings: Settings, topic: str, *, from_end: bool) -> None:
        self.consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap,
                                         enable_auto_commit=False,
                                         auto_offset_reset="latest" if from_end else "earliest")
        self.events: list[Event] = []

    async def start(self) -> None:
        await self.consumer.start()
        await eventually(self.consumer.assignment)
        for tp in self.consumer.assignment():  # fixes the start position before anything is sent
            await self.consumer.position(tp)

    async def stop(self) -> None:
        await self.consumer.stop()

    async def until(self, batch_id: str, done: Callable[[list[Event]], bool],
                    timeout: float = 20.0) -> list[Event]:
        """The batch's events, read until `done(events)` holds."""

        async def check() -> bool:
            batches = await self.consumer.getmany(timeout_ms=100)
            for records in batches.values():
                for record in records:
                    event = decode_event(record.value)
                    if event.batch_id == batch_id:
                        self.events.append(event)
            return done(self.events)

        await eventually(check, timeout=timeout, interval=0)
        return self.events


def step_states(events: list[Event]) -> list[tuple[str | None, str | None]]:
    return [(e.step, e.state) for e in events if e.type == "step.state"]


def merged_offsets(events: list[Event]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for e in events:
        if e.type == "step.offsets" and e.offsets:
            for part, value in e.offsets.items():
                assert value >= merged.get(part, 0), "offsets went backwards"
                merged[part] = value
    return merged


def ended(step: str) -> Callable[[list[Event]], bool]:
    return lambda events: any(e.type == "step.state" and e.step == step
                              and e.state in ("success", "failed") for e in events)


@pytest.fixture
async def tail(topics: Settings) -> AsyncIterator[EventTail]:
    reader = EventTail(topics, topics.topic_events, from_end=False)
    try:
        await reader.start()
        yield reader
    finally:
        await reader.stop()


@pytest.fixture
async def publisher(topics: Settings) -> AsyncIterator[EventPublisher]:
    producer = await open_producer(topics)
    try:
        yield EventPublisher(producer, topics.topic_events, BATCH, PIPELINE)
    finally:
        await producer.stop()


async def test_many_reports_become_few_events_with_exact_final_offsets(
        publisher: EventPublisher, tail: EventTail, topics: Settings) -> None:
    parts, per_part = ("partition_0", "partition_1", "partition_2"), 3_000

    def step(ctx: StepContext) -> None:
        for i in range(1, per_part + 1):
            for part in parts:
                ctx.report(part, i, per_part)
            if i % 100 == 0:
                time.sleep(0.03)  # the step's own work: ~1 s in all, several report periods

    started = time.monotonic()
    ctx = await run_step(step, publisher, "extract", {}, topics)
    took = time.monotonic() - started
    events = await tail.until(BATCH, ended("extract"))

    assert step_states(events) == [("extract", "running"), ("extract", "success")]
    assert events[0].type == "step.state" and events[-1].type == "step.state"
    offsets = [e for e in events if e.type == "step.offsets"]
    # 9000 reports -> one event per period at most, plus the final flush
    assert 2 <= len(offsets) <= took / REPORT_INTERVAL_S + 2
    periodic_gaps = [b.ts - a.ts for a, b in itertools.pairwise(offsets[:-1])]
    assert all(gap >= REPORT_INTERVAL_S * 0.9 for gap in periodic_gaps), periodic_gaps
    assert merged_offsets(events) == dict.fromkeys(parts, per_part)
    assert ctx.offsets == dict.fromkeys(parts, per_part)
    assert ctx.totals == dict.fromkeys(parts, per_part)
    # The totals travel with the offsets: the batch can show percent and ETA.
    sent_totals: dict[str, int] = {}
    for event in offsets:
        sent_totals.update(event.totals or {})
    assert sent_totals == dict.fromkeys(parts, per_part)
    assert all(e.batch_id == BATCH and e.pipeline_id == PIPELINE for e in events)


async def test_async_step_and_config(publisher: EventPublisher, tail: EventTail,
                                     topics: Settings) -> None:
    async def step(ctx: StepContext) -> None:
        assert (ctx.batch_id, ctx.pipeline_id, ctx.step) == (BATCH, PIPELINE, "load")
        for i in range(ctx.config["n"]):
            ctx.report("partition_7", i + 1)
            await asyncio.sleep(0)

    await run_step(step, publisher, "load", {"n": 500}, topics)
    events = await tail.until(BATCH, ended("load"))
    assert step_states(events) == [("load", "running"), ("load", "success")]
    assert merged_offsets(events) == {"partition_7": 500}


async def test_a_failing_step_publishes_its_progress_then_failed(
        publisher: EventPublisher, tail: EventTail, topics: Settings) -> None:
    def step(ctx: StepContext) -> None:
        for i in range(1, 101):
            ctx.report("partition_0", i)
        raise StepFailed("bad input")

    with pytest.raises(StepFailed, match="bad input"):
        await run_step(step, publisher, "transform", {}, topics)
    events = await tail.until(BATCH, ended("transform"))
    assert step_states(events) == [("transform", "running"), ("transform", "failed")]
    assert merged_offsets(events) == {"partition_0": 100}


class FakeProducer:
    """What a fake needs beyond `send_and_wait` to stand for a producer: nothing to close."""

    async def stop(self) -> None:
        return None


class FlakyProducer(FakeProducer):
    """A real producer whose sends fail (before reaching Kafka) on the chosen attempts."""

    def __init__(self, inner: Any, fail_on: set[int]) -> None:
        self.inner = inner
        self.fail_on = fail_on
        self.attempts = 0

    async def send_and_wait(self, topic: str, value: bytes | None = None,
                            key: bytes | None = None) -> Any:
        self.attempts += 1
        if self.attempts in self.fail_on:
            raise KafkaConnectionError("broker went away")
        return await self.inner.send_and_wait(topic, value=value, key=key)


async def test_kafka_hiccups_are_retried_and_lose_nothing(
        publisher: EventPublisher, tail: EventTail, topics: Settings) -> None:
    flaky = FlakyProducer(publisher.producer, fail_on={1, 3, 4, 7, 8, 9})
    events_out = EventPublisher(flaky, topics.topic_events, BATCH, PIPELINE,
                                first_backoff_s=0.01)

    def step(ctx: StepContext) -> None:
        for i in range(1, 2_001):
            ctx.report("partition_0", i)
            ctx.report("partition_1", i // 2)
            if i % 200 == 0:
                time.sleep(0.05)

    await run_step(step, events_out, "extract", {}, topics)
    events = await tail.until(BATCH, ended("extract"))
    assert flaky.attempts > 6
    assert step_states(events) == [("extract", "running"), ("extract", "success")]
    assert merged_offsets(events) == {"partition_0": 2_000, "partition_1": 1_000}
    assert len({e.event_id for e in events}) == len(events)


class DeadAfter(FakeProducer):
    """Records what it delivers, then fails every send from the n-th on (Kafka down)."""

    def __init__(self, working_sends: int) -> None:
        self.working_sends = working_sends
        self.delivered: list[Event] = []

    async def send_and_wait(self, topic: str, value: bytes | None = None,
                            key: bytes | None = None) -> None:
        if len(self.delivered) >= self.working_sends:
            raise KafkaConnectionError("no broker")
        self.delivered.append(decode_event(value))


async def test_undeliverable_final_offsets_fail_the_step_loudly(topics: Settings) -> None:
    producer = DeadAfter(working_sends=1)  # `running` gets through, nothing after it
    events_out = EventPublisher(producer, "t", BATCH, PIPELINE, deadline_s=0.3,
                                first_backoff_s=0.01)

    def step(ctx: StepContext) -> None:
        ctx.report("partition_0", 10)

    with pytest.raises(PublishError, match=r"step\.offsets"):
        await run_step(step, events_out, "extract", {}, topics, interval_s=0.05)
    assert [(e.type, e.state) for e in producer.delivered] == [("step.state", "running")]


class Refusing(FakeProducer):
    """A broker that will never take the record (too large): no retry can help."""

    def __init__(self) -> None:
        self.calls = 0

    async def send_and_wait(self, topic: str, value: bytes | None = None,
                            key: bytes | None = None) -> None:
        self.calls += 1
        raise MessageSizeTooLargeError("record too large")


async def test_a_permanent_send_error_is_raised_without_retries() -> None:
    producer = Refusing()
    events_out = EventPublisher(producer, "t", BATCH, PIPELINE, deadline_s=30,
                                first_backoff_s=0.01)
    with pytest.raises(PublishError, match="after 1 attempts"):
        await events_out.step_state("extract", "running")
    assert producer.calls == 1


async def test_reports_are_validated_and_stop_after_abort(topics: Settings) -> None:
    producer = DeadAfter(working_sends=100)
    events_out = EventPublisher(producer, "t", BATCH, PIPELINE)
    seen: list[StepContext] = []

    def step(ctx: StepContext) -> None:
        seen.append(ctx)
        for bad in (("bad name!", 1), ("partition_0", -1), ("partition_0", True)):
            with pytest.raises(ValueError, match="invalid"):
                ctx.report(*bad)
        with pytest.raises(ValueError, match="invalid total"):
            ctx.report("partition_0", 1, total=-5)

    await run_step(step, events_out, "extract", {"k": 1}, topics)
    ctx = seen[0]
    with pytest.raises(TypeError):
        ctx.config["k"] = 2  # type: ignore[index]
    ctx.abort()
    with pytest.raises(StepAborted):
        ctx.report("partition_0", 5)


async def test_batch_state_reason_is_bounded(topics: Settings) -> None:
    producer = DeadAfter(working_sends=1)
    await EventPublisher(producer, "t", BATCH, PIPELINE).batch_state(
        "stop", outcome="failed", reason="x" * 10_000)
    assert producer.delivered[0].reason is not None
    assert len(producer.delivered[0].reason) <= 2000


async def test_a_running_flow_waits_a_kafka_outage_out(topics: Settings) -> None:
    """The flow's producer starts once Kafka is back, instead of failing the run after a few
    tries (a broker restart takes tens of seconds)."""
    proxy = KafkaProxy(topics.kafka_bootstrap.split(",")[0])
    await proxy.start()
    try:
        proxy.cut()
        settings = topics.model_copy(update={"kafka_bootstrap": proxy.address,
                                             "publish_deadline_s": 120.0})
        starting = asyncio.create_task(start_producer(settings))
        # Longer than the old five tries (~7.5 s of backoff) would have waited.
        done, _ = await asyncio.wait({starting}, timeout=9)
        assert not done, "the producer gave up (or connected) while Kafka was unreachable"
        proxy.restore()
        producer = await asyncio.wait_for(starting, 60)
        try:
            events_out = EventPublisher(producer, topics.topic_events, BATCH, PIPELINE)
            await events_out.step_state("extract", "running")
        finally:
            await producer.stop()
    finally:
        await proxy.close()
