"""A step with thousands of partitions: its offsets go out in several `step.offsets` events,
each well under Kafka's 1 MB record limit, on success and on failure alike."""

from __future__ import annotations

import time
from typing import Any

import pytest
from aiokafka.errors import MessageSizeTooLargeError

from core.codec import Event, decode_event
from core.connections import open_producer
from core.settings import Settings
from pipelines.offsets import OFFSETS_EVENT_BYTES, REPORT_INTERVAL_S, OffsetBook, publish_offsets
from pipelines.publisher import EventPublisher, PublishError
from pipelines.sdk import StepContext, StepFailed, run_step
from tests.helpers import read_topic

# Partition names are ids of up to 128 characters, and nothing bounds how many a step has:
# 4,000 of them with totals made one event of ~1.1 MB, which the producer refuses for ever.
PARTS = [f"p{i:05d}-" + "x" * 121 for i in range(4_000)]
DONE = (250_000, 500_000, 750_000, 1_000_000)


async def _events_of(settings: Settings, batch_id: str, step_fn: Any) -> list[Event]:
    """Runs `step_fn` as step `extract` of `batch_id`; its events, read to its end."""
    producer = await open_producer(settings)
    try:
        publisher = EventPublisher(producer, settings.topic_events, batch_id, "many",
                                   deadline_s=5)
        try:
            await run_step(step_fn, publisher, "extract", {}, settings)
        except StepFailed:
            pass
        except PublishError as exc:
            pytest.fail(f"the step failed on its own offsets: {exc}")
    finally:
        await producer.stop()

    def ended(records: list[Any]) -> bool:
        return any(b'"success"' in r.value or b'"failed"' in r.value for r in records)

    records = await read_topic(settings, settings.topic_events, ended, 20)
    # Each record well under the limit, whatever the number of partitions.
    assert max(len(r.value) for r in records) < OFFSETS_EVENT_BYTES + 4_096
    return [decode_event(r.value) for r in records]


def _merged(events: list[Event]) -> dict[str, int]:
    """The offsets the events say, checking that none goes backwards (APPLY_EVENTS' rule)."""
    merged: dict[str, int] = {}
    for event in events:
        for part, value in (event.offsets or {}).items():
            assert value >= merged.get(part, 0), "an offset went backwards"
            merged[part] = value
    return merged


@pytest.mark.timeout(90)
async def test_a_step_with_thousands_of_partitions_reports_them_and_succeeds(
        topics: Settings) -> None:
    def step(ctx: StepContext) -> None:
        # Every partition moves in every report period (a step reading them all at once).
        for done in DONE:
            for part in PARTS:
                ctx.report(part, done, 1_000_000)
            time.sleep(REPORT_INTERVAL_S * 1.5)

    events = await _events_of(topics, "batch-many-ok", step)
    assert _merged(events) == dict.fromkeys(PARTS, 1_000_000)
    totals: dict[str, int] = {}
    for event in events:
        totals.update(event.totals or {})
    assert totals == dict.fromkeys(PARTS, 1_000_000)
    assert [e.state for e in events if e.type == "step.state"] == ["running", "success"]


@pytest.mark.timeout(90)
async def test_a_failing_step_with_thousands_of_partitions_still_reports_failed(
        topics: Settings) -> None:
    def step(ctx: StepContext) -> None:
        for part in PARTS:
            ctx.report(part, 7, 10)
        raise StepFailed("bad input")

    events = await _events_of(topics, "batch-many-failed", step)
    assert _merged(events) == dict.fromkeys(PARTS, 7)
    assert [e.state for e in events if e.type == "step.state"] == ["running", "failed"]


class FailsSecond:
    """A producer that delivers its first record and refuses every later one."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send_and_wait(self, topic: str, value: bytes | None = None,
                            key: bytes | None = None) -> None:
        if self.sent:
            raise MessageSizeTooLargeError("refused")
        self.sent.append(value or b"")

    async def stop(self) -> None:
        pass


async def test_the_parts_not_delivered_are_given_back_and_the_delivered_ones_are_not() -> None:
    producer = FailsSecond()
    events = EventPublisher(producer, "t", "batch-many-parts", "many", deadline_s=1)
    book = OffsetBook()
    for part in PARTS:
        book.record(part, 5, 9)
    with pytest.raises(PublishError):
        await publish_offsets(events, "extract", book, book.take())
    [first] = producer.sent
    delivered = decode_event(first).offsets or {}
    assert 0 < len(delivered) < len(PARTS)
    assert book.take() == {p: 5 for p in PARTS if p not in delivered}  # the rest, marked again
