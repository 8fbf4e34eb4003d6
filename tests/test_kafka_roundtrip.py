"""The broker of the local stack with aiokafka: an idempotent acks=all producer, manual commits,
and a restarted consumer resuming exactly after what it committed."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from core.connections import open_producer
from core.settings import Settings


async def _consume(settings: Settings, count: int, commit_after: int | None) -> list[bytes]:
    consumer = AIOKafkaConsumer(settings.topic_events, bootstrap_servers=settings.kafka_bootstrap,
                                group_id=settings.group_events, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    seen: list[bytes] = []
    try:
        async with asyncio.timeout(20):
            while len(seen) < count:
                for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                    for record in records:
                        seen.append(record.value)
                        if commit_after is not None and len(seen) == commit_after:
                            await consumer.commit({tp: record.offset + 1})
    finally:
        await consumer.stop()
    return seen


async def test_round_trip_with_manual_commit_and_restart(topics: Settings) -> None:
    # One partition of its own, so "what comes after the commit" is well defined.
    settings = topics
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    single = settings.topic_events + ".single"
    await admin.create_topics([NewTopic(single, 1, 1)])
    settings = settings.model_copy(update={"topic_events": single})
    try:
        producer = await open_producer(settings)
        try:
            for n in range(10):
                await producer.send_and_wait(single, f"m{n}".encode(), key=b"k")
            # Idempotence (which aiokafka only allows with acks=all) means the broker handed
            # this producer an id for its sequence numbers.
            assert producer._txn_manager is not None and producer._txn_manager.producer_id >= 0
        finally:
            await producer.stop()

        # First consumer reads everything but commits only after the 4th message, then dies.
        first = await _consume(settings, 10, commit_after=4)
        assert first == [f"m{n}".encode() for n in range(10)]
        # A new consumer of the same group resumes right after the committed offset.
        second = await _consume(settings, 6, commit_after=None)
        assert second == [f"m{n}".encode() for n in range(4, 10)]

        check = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                                 group_id=settings.group_events, enable_auto_commit=False)
        await check.start()
        try:
            assert await check.committed(TopicPartition(single, 0)) == 4
        finally:
            await check.stop()
    finally:
        await admin.delete_topics([single])
        await admin.close()
