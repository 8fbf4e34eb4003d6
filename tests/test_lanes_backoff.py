"""A lane whose handler fails in a way nobody expected reads the record again after a pause
that grows while it keeps failing, not in a hot loop; a record that then succeeds is
committed and the pause is forgotten. Real Kafka."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time

from consumers.plumbing.kafka import Record, open_consumer
from consumers.plumbing.lanes import Lanes
from core.connections import open_producer
from core.retry import Backoff, RetryPolicy
from core.settings import Settings
from tests.conftest import eventually

FAILURES = 3


async def test_an_unexpected_failure_is_read_again_after_a_growing_pause(
        topics: Settings) -> None:
    producer = await open_producer(topics)
    try:
        await producer.send_and_wait(topics.topic_commands, b"first", key=b"k")
    finally:
        await producer.stop()
    attempts: list[float] = []

    async def handle(record: Record, backoff: Backoff) -> None:
        attempts.append(time.monotonic())
        if len(attempts) <= FAILURES:
            raise RuntimeError("a bug")

    lanes = Lanes("test", handle, RetryPolicy(initial_s=0.2, cap_s=0.8), revoke_wait_s=1.0)
    consumer = await open_consumer(topics, "test", topics.topic_commands,
                                   topics.group_commands, listener=lanes, revoke_wait_s=1.0)
    lanes.consumer = consumer

    async def poll() -> None:
        while True:
            for tp, records in (await consumer.getmany(timeout_ms=50)).items():
                if records:
                    lanes.start(tp, records)

    poller = asyncio.create_task(poll())
    try:
        # handled counts the effect; the commit comes after it, within the lane's task
        await eventually(lambda: lanes.handled == 1 and lanes.busy() == 0, timeout=20)
        committed = {tp.partition: await consumer.committed(tp)
                     for tp in consumer.assignment()}
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
        await lanes.drain(1.0)
        await consumer.stop()
    assert len(attempts) == FAILURES + 1
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    # 0.2, 0.4, 0.8 s (the cap) between attempts, each at least its pause.
    assert all(gap >= pause * 0.95
               for gap, pause in zip(gaps, (0.2, 0.4, 0.8), strict=True)), gaps
    assert sorted(v for v in committed.values() if v is not None) == [1]
