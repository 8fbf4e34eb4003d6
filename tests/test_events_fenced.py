"""A poll whose assignment was revoked after it was fetched (while it was decoded, or
applied) is never committed by this consumer: its partitions' owners read it again from the
last commit and do all of it. Its dead letters and re-keyed records, sent from here as well,
came twice (real Kafka and Redis)."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from redis.asyncio import Redis

from consumers.events import EventsConsumer
from consumers.plumbing.polls import decode
from core import keys
from core.codec import Event
from core.settings import Settings
from tests.test_consumers_support import make_spec, new_batch, options, running, unique

pytestmark = pytest.mark.timeout(60)


def _record(tp: TopicPartition, offset: int, key: bytes,
            value: bytes) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(tp.topic, tp.partition, offset, 0, 0, key, value, None, len(key),
                          len(value), ())


async def test_a_poll_fenced_after_its_fetch_sends_nothing(topics: Settings,
                                                           redis: Redis) -> None:
    pipeline_id = unique("test-fenced")
    batch_id = await new_batch(redis, topics, pipeline_id, make_spec(pipeline_id))
    good = Event("batch.state", batch_id, pipeline_id, state="running").encode()
    tp = TopicPartition(topics.topic_events, 0)
    records = {tp: [_record(tp, 0, batch_id.encode(), b"{not json"),
                    _record(tp, 1, batch_id.encode(), good),
                    _record(tp, 2, b"keyed-otherwise", good)]}
    consumer = EventsConsumer(topics, options())
    async with running(consumer):
        fetched = await decode(records, consumer.stages.epoch)
        await consumer.stages.on_partitions_revoked([tp])  # the revoke, after the fetch
        covered = await consumer._effect(fetched)
        assert (consumer.applied, consumer.dead, consumer.rekeyed) == (0, 0, 0)
        assert not covered.offsets
        assert await redis.hget(keys.batch(pipeline_id, batch_id), "state") == "pending"
        # The same records fetched under the current assignment: all of it is done.
        current = await decode(records, consumer.stages.epoch)
        covered = await consumer._effect(current)
        assert (consumer.applied, consumer.dead, consumer.rekeyed) == (1, 1, 1)
        assert covered.offsets == {tp: 3}
        assert await redis.hget(keys.batch(pipeline_id, batch_id), "state") == "running"
