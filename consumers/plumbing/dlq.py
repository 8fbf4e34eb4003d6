"""The dead-letter topic: what could not be applied, byte for byte, with the reason.

Format: the record's original key and value unchanged (so a tool can re-produce it as is),
and headers saying why and where from:
  dhub-dlq-reason     why it was rejected (UTF-8, at most 2000 chars)
  dhub-dlq-source     "<topic>:<partition>:<offset>" of the original record
  dhub-dlq-consumer   which consumer rejected it ("commands", "events")
  dhub-dlq-ts         when, unix seconds

A record the source topic took can be too large for the dead-letter topic once the headers
are added (a malformed value just under the producer's 1 MB limit), and the producer or the
broker then refuses its dead letter (MessageSizeTooLargeError, a permanent error). Raised,
that ended the consumer's loop on the same record at every restart: the partition never
moved on. Such a record is dead-lettered as a stub instead: the same headers, an empty value
(and no key if the key is what is too large), and
  dhub-dlq-omitted     what was left out: "value", or "key,value"
  dhub-dlq-value-size  the original value's size in bytes
  dhub-dlq-key-size    the original key's size in bytes (only when the key was left out)
The original stays readable at `dhub-dlq-source` for as long as that topic retains it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError

from consumers.plumbing.kafka import Record

log = logging.getLogger(__name__)

MAX_REASON: Final = 2000
REASON: Final = "dhub-dlq-reason"
SOURCE: Final = "dhub-dlq-source"
CONSUMER: Final = "dhub-dlq-consumer"
TS: Final = "dhub-dlq-ts"
OMITTED: Final = "dhub-dlq-omitted"
VALUE_SIZE: Final = "dhub-dlq-value-size"
KEY_SIZE: Final = "dhub-dlq-key-size"
# A stub keeps the record's key up to this size. Every topic read here is keyed by an id (at
# most 128 characters): a longer key is itself part of what is wrong with the record.
MAX_STUB_KEY: Final = 4096
# The producer's refusal (raised by `send`) and the broker's (the future's exception).
_TOO_LARGE: Final = (MessageSizeTooLargeError, RecordListTooLargeError)


def headers(record: Record, reason: str, consumer: str) -> list[tuple[str, bytes]]:
    return [
        (REASON, reason[:MAX_REASON].encode()),
        (SOURCE, f"{record.topic}:{record.partition}:{record.offset}".encode()),
        (CONSUMER, consumer.encode()),
        (TS, f"{time.time():.3f}".encode()),
    ]


def stub(record: Record, with_headers: list[tuple[str, bytes]]
         ) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    """The key and headers of the stub standing for `record`'s dead letter (its value: b"").
    At most MAX_STUB_KEY + ~8 KB (a reason of 2000 characters): it fits any topic."""
    key: bytes | None = record.key
    value_size = len(record.value or b"")
    extra = [(VALUE_SIZE, str(value_size).encode())]
    omitted = b"value"
    if key is not None and len(key) > MAX_STUB_KEY:
        extra.append((KEY_SIZE, str(len(key)).encode()))
        key, omitted = None, b"key,value"
    return key, [*with_headers, (OMITTED, omitted), *extra]


class DeadLetters:
    def __init__(self, producer: AIOKafkaProducer, topic: str, consumer: str) -> None:
        self._producer = producer
        self._topic = topic
        self._consumer = consumer
        # Records the broker acknowledged, by reason kind ("malformed", "unapplicable",
        # "gave_up"): for the metrics. A stub counts as its record's dead letter.
        self.sent: dict[str, int] = {}
        # Dead letters sent as stubs (too large for the topic).
        self.stubs = 0

    async def send(self, record: Record, reason: str, kind: str) -> asyncio.Future[Any]:
        """Queues one record's dead letter; await the returned future before committing past
        it. A dead letter refused as too large, by the producer or the broker, is replaced
        by its stub (see the module's doc): the future then stands for the stub."""
        with_headers = headers(record, reason, self._consumer)
        future: asyncio.Future[Any]
        try:
            sent = await self._producer.send(
                self._topic, value=record.value, key=record.key, headers=with_headers)
        except _TOO_LARGE as exc:
            future = await self._send_stub(record, with_headers, exc)
        else:
            future = asyncio.ensure_future(self._stub_if_refused(sent, record, with_headers))
        future.add_done_callback(lambda f: self._count(f, kind))
        return future

    async def send_and_wait(self, record: Record, reason: str, kind: str) -> None:
        await (await self.send(record, reason, kind))

    async def _stub_if_refused(self, sent: asyncio.Future[Any], record: Record,
                               with_headers: list[tuple[str, bytes]]) -> Any:
        try:
            return await sent
        except _TOO_LARGE as exc:
            return await (await self._send_stub(record, with_headers, exc))

    async def _send_stub(self, record: Record, with_headers: list[tuple[str, bytes]],
                         exc: Exception) -> asyncio.Future[Any]:
        key, stub_headers = stub(record, with_headers)
        log.warning("dead letter of %s:%d:%d refused as too large (%s): sent without its "
                    "value (%d bytes)", record.topic, record.partition, record.offset,
                    type(exc).__name__, len(record.value or b""))
        self.stubs += 1
        future: asyncio.Future[Any] = await self._producer.send(
            self._topic, value=b"", key=key, headers=stub_headers)
        return future

    def _count(self, future: asyncio.Future[Any], kind: str) -> None:
        if not future.cancelled() and future.exception() is None:
            self.sent[kind] = self.sent.get(kind, 0) + 1
