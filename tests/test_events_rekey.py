"""Events keyed other than by their batch id (a producer outside this project keying by
pipeline, or not at all) land on a partition another consumer may own, and two consumers
would then apply and snapshot one batch each on their own: the later snapshot on the
compacted topic could be the older one, and a rebuild would restore it. Such an event is
sent again keyed by its batch id (to its batch's partition) and committed once Kafka has it;
it is applied there, by the batch's one owner."""

from __future__ import annotations

from redis.asyncio import Redis

from consumers.events import EventsConsumer
from consumers.plumbing.metrics import ConsumersCollector
from core import keys
from core.codec import Event
from core.connections import open_producer
from core.settings import Settings
from tests.conftest import eventually
from tests.helpers import read_topic
from tests.test_consumers_support import (
    events_committed_is,
    make_spec,
    new_batch,
    options,
    running,
    send,
    unique,
)


async def test_an_event_keyed_otherwise_goes_to_its_batchs_partition_and_is_applied(
        topics: Settings, redis: Redis) -> None:
    pipeline_id = unique("test-rekey")
    batch_id = await new_batch(redis, topics, pipeline_id, make_spec(pipeline_id))
    by_pipeline = Event("step.offsets", batch_id, pipeline_id, step="extract",
                        offsets={"p0": 7}).encode()
    unkeyed = Event("step.offsets", batch_id, pipeline_id, step="extract",
                    offsets={"p1": 9}).encode()
    consumer = EventsConsumer(topics, options())
    async with running(consumer):
        producer = await open_producer(topics)
        try:  # with a header of the producer's own, which the copy keeps
            await producer.send_and_wait(topics.topic_events, by_pipeline,
                                         key=pipeline_id.encode(), headers=[("trace", b"t-1")])
        finally:
            await producer.stop()
        await send(topics, topics.topic_events, None, unkeyed)
        key = keys.batch(pipeline_id, batch_id)

        async def applied() -> bool:
            return await redis.hmget(key, ["off:extract:p0", "off:extract:p1"]) == ["7", "9"]

        await eventually(applied)
        # The two re-sent, keyed by the batch, and everything committed (four records).
        await eventually(lambda: events_committed_is(topics, 4), timeout=20)
    records = await read_topic(topics, topics.topic_events, lambda rs: len(rs) >= 4)
    resent = {(r.value, tuple(r.headers)) for r in records if r.key == batch_id.encode()}
    assert resent == {(by_pipeline, (("trace", b"t-1"),)), (unkeyed, ())}
    assert (consumer.dead, consumer.rekeyed) == (0, 2)
    metrics = ConsumersCollector([consumer])
    found = {m.name: m.samples[0].value for m in metrics.collect() if m.samples}
    assert found["dhub_events_rekeyed"] == 2

