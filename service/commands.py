"""Producing commands and events to Kafka from the API, answering 503 when Kafka cannot take them."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from core.codec import Command, Event
from service.errors import ApiError

log = logging.getLogger(__name__)


class CommandSender:
    def __init__(self, producer: AIOKafkaProducer, commands_topic: str, events_topic: str,
                 timeout: float = 10.0) -> None:
        self._producer = producer
        self._commands_topic = commands_topic
        self._events_topic = events_topic
        self._timeout = timeout

    async def _send(self, topic: str, key: bytes, value: bytes) -> None:
        """Returns once the broker acknowledged the record (acks=all); 503 otherwise."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._producer.send_and_wait(topic, value=value, key=key)
        except (KafkaError, TimeoutError) as exc:
            log.warning("kafka did not take a record for %s: %s", topic, type(exc).__name__)
            raise ApiError(503, "unavailable", "the command queue is unavailable; retry later") \
                from None

    async def command(self, command: Command) -> None:
        await self._send(self._commands_topic, command.key, command.encode())

    async def events(self, events: list[Event]) -> None:
        for event in events:
            await self._send(self._events_topic, event.batch_id.encode(), event.encode())
