"""Opening the Redis client and the Kafka producer: bounded retries that log, then raise."""

from __future__ import annotations

import logging
from typing import TypeVar

from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from core.retry import retrying
from core.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


async def open_redis(settings: Settings, tries: int = 5) -> Redis:
    client = Redis.from_url(settings.redis_url, decode_responses=True,
                            socket_connect_timeout=2, health_check_interval=30)

    async def ping() -> Redis:
        await client.ping()
        return client

    try:
        return await retrying("redis", ping, tries)
    except Exception:
        await client.aclose()
        raise


def make_producer(settings: Settings, **overrides: object) -> AIOKafkaProducer:
    """acks=all and idempotence: a record the broker acknowledged is never lost nor doubled."""
    options: dict[str, object] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 1,
        "request_timeout_ms": 10_000,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


async def open_producer(settings: Settings, tries: int = 5, **overrides: object) -> AIOKafkaProducer:
    async def start() -> AIOKafkaProducer:
        producer = make_producer(settings, **overrides)
        try:
            await producer.start()
        except Exception:
            await producer.stop()
            raise
        return producer

    return await retrying("kafka", start, tries)
