"""One resource scope per process: its parts share one Redis client and one producer, which
close after every part has stopped and closed, in reverse of opening."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from consumers import runner
from consumers.bridge import PrefectBridge
from consumers.commands import CommandsConsumer
from consumers.events import EventsConsumer
from consumers.plumbing import part as part_module
from consumers.plumbing.part import Part
from consumers.plumbing.scope import serving
from consumers.reconciler import Reconciler
from consumers.retention import RetentionSweeper
from core.connections import open_producer, open_redis
from core.settings import Settings
from tests.test_consumers_support import options


async def test_the_parts_of_a_process_share_one_redis_client_and_one_producer(
        topics: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[Any] = []
    closed: list[str] = []

    async def counting_redis(settings: Settings) -> Redis:
        client = await open_redis(settings)
        opened.append(client)
        aclose = client.aclose

        async def logged_aclose() -> None:
            closed.append("redis")
            await aclose()
        monkeypatch.setattr(client, "aclose", logged_aclose)
        return client

    async def counting_producer(settings: Settings) -> AIOKafkaProducer:
        producer = await open_producer(settings)
        opened.append(producer)
        stop = producer.stop

        async def logged_stop() -> None:
            closed.append("producer")
            await stop()
        monkeypatch.setattr(producer, "stop", logged_stop)
        return producer

    original_close = Part.close

    async def logged_close(self: Part) -> None:
        closed.append(self.name)
        await original_close(self)

    monkeypatch.setattr(part_module, "open_redis", counting_redis)
    monkeypatch.setattr(part_module, "open_producer", counting_producer)
    monkeypatch.setattr(Part, "close", logged_close)

    parts = runner.build("all", topics, options())
    async with serving(parts, topics, 10.0) as live:
        assert len(opened) == 2  # was 4 Redis clients (plus the runner's) and 4 producers
        redis, producer = live.clients.redis, live.clients.producer
        events, commands, bridge, reconciler, retention = parts
        assert isinstance(events, EventsConsumer) and isinstance(commands, CommandsConsumer)
        assert isinstance(bridge, PrefectBridge) and isinstance(reconciler, Reconciler)
        assert isinstance(retention, RetentionSweeper)
        assert events.store.redis is redis and commands.store.redis is redis
        assert bridge._redis is redis and reconciler._redis is redis
        assert bridge._producer is producer
        assert events.dlq._producer is producer and commands.dlq._producer is producer
        assert reconciler.emitter._producer is producer
        assert retention.store.redis is redis and retention.snapshots.producer is producer
        assert not any(task.done() for task in live.tasks)
    # Every part stopped and closed (in reverse of their start), the shared clients last.
    assert closed == ["retention", "reconciler", "bridge", "commands", "events", "producer",
                      "redis"]
    assert all(task.done() and task.exception() is None for task in live.tasks)


async def test_a_part_started_alone_opens_and_closes_clients_of_its_own(
        topics: Settings) -> None:
    bridge = PrefectBridge(topics, options())
    await bridge.start()
    producer = bridge._producer
    assert producer is not None and bridge._redis is not None
    await bridge.close()
    assert producer._closed
    await bridge.close()  # twice is harmless
