"""Publishing the project's events: to the events topic first, then (optionally) to Redis.

The topic comes first so that Redis never holds a change the topics could not rebuild;
applying at once as well makes a command's effect visible without waiting for the events
consumer. Both are idempotent by event id, so a retry after a partial failure is safe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer

from core.codec import Event
from core.store import BatchStore


class Emitter:
    def __init__(self, producer: AIOKafkaProducer, topic: str, store: BatchStore | None = None,
                 ) -> None:
        self._producer = producer
        self._topic = topic
        self._store = store

    async def publish(self, events: Sequence[Event]) -> None:
        """Returns once the broker has every event (acks=all); keyed by batch id so one
        batch's events stay in order on one partition."""
        futures = [
            await self._producer.send(self._topic, value=e.encode(), key=e.batch_id.encode())
            for e in events
        ]
        if futures:
            await asyncio.gather(*futures)

    async def emit(self, events: Sequence[Event]) -> None:
        await self.publish(events)
        if self._store is not None and events:
            await self._store.apply(events)
