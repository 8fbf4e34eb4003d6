"""The dead-letter topic: what could not be applied, byte for byte, with the reason.

Format: the record's original key and value unchanged (so a tool can re-produce it as is),
and headers saying why and where from:
  dhub-dlq-reason     why it was rejected (UTF-8, at most 2000 chars)
  dhub-dlq-source     "<topic>:<partition>:<offset>" of the original record
  dhub-dlq-consumer   which consumer rejected it ("commands", "events")
  dhub-dlq-ts         when, unix seconds
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

from aiokafka import AIOKafkaProducer

from consumers.plumbing.kafka import Record

MAX_REASON: Final = 2000
REASON: Final = "dhub-dlq-reason"
SOURCE: Final = "dhub-dlq-source"
CONSUMER: Final = "dhub-dlq-consumer"
TS: Final = "dhub-dlq-ts"


def headers(record: Record, reason: str, consumer: str) -> list[tuple[str, bytes]]:
    return [
        (REASON, reason[:MAX_REASON].encode()),
        (SOURCE, f"{record.topic}:{record.partition}:{record.offset}".encode()),
        (CONSUMER, consumer.encode()),
        (TS, f"{time.time():.3f}".encode()),
    ]


class DeadLetters:
    def __init__(self, producer: AIOKafkaProducer, topic: str, consumer: str) -> None:
        self._producer = producer
        self._topic = topic
        self._consumer = consumer
        # Records the broker acknowledged, by reason kind ("malformed", "unapplicable",
        # "gave_up"): for the metrics.
        self.sent: dict[str, int] = {}

    async def send(self, record: Record, reason: str, kind: str) -> asyncio.Future[Any]:
        """Queues one record; await the returned future before committing past it."""
        future: asyncio.Future[Any] = await self._producer.send(
            self._topic, value=record.value, key=record.key,
            headers=headers(record, reason, self._consumer),
        )  # fmt: skip
        future.add_done_callback(lambda f: self._count(f, kind))
        return future

    async def send_and_wait(self, record: Record, reason: str, kind: str) -> None:
        await (await self.send(record, reason, kind))

    def _count(self, future: asyncio.Future[Any], kind: str) -> None:
        if not future.cancelled() and future.exception() is None:
            self.sent[kind] = self.sent.get(kind, 0) + 1
