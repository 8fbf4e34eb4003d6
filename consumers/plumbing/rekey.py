"""Events keyed other than by their batch id, sent again keyed by it.

The events topic's partitions are owned one consumer each, and every batch's events must
reach one owner: that consumer alone applies the batch and writes its snapshots, in order,
to the compacted snapshots topic. An event keyed by something else (a producer outside this
project keying by pipeline, or not keying) lands wherever its key sends it; applied there,
two consumers would snapshot one batch independently, and the last snapshot on the topic,
the one compaction keeps and a rebuild restores, could be the older. The consumer that reads
such an event sends it again (its value byte for byte, its headers) keyed by its batch id,
and commits it only once Kafka has the copy: it is applied by the batch's owner, in no
particular order among the batch's other events, which APPLY_EVENTS' rules allow.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaProducer

from consumers.plumbing.kafka import Record


async def send_keyed(producer: AIOKafkaProducer, topic: str,
                     records: list[tuple[bytes, Record]]) -> None:
    """Sends each record's value and headers under the key given, and awaits every
    acknowledgement. All or nothing for `Backoff`: any failure raises after every send
    queued was awaited (a retry sends them all again: a copy applied twice changes
    nothing)."""
    futures: list[asyncio.Future[Any]] = []
    try:
        for key, record in records:
            futures.append(await producer.send(topic, value=record.value, key=key,
                                               headers=list(record.headers or ())))
    finally:
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
