"""The events consumer against a Redis that stops taking writes for a while: a replica after a
failover (READONLY), a full server (OOM), a long script (BUSY). Each is waited out: nothing is
dead-lettered, nothing is committed past, and after recovery every batch reaches its final
state. Only a permanent script error (the batch's own data) goes batch by batch to the dead
letters. Each test runs its own redis-server (the shared one must never be broken).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from redis._parsers import _AsyncRESP2Parser
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from consumers.events import EventsConsumer
from consumers.plumbing import dlq
from consumers.plumbing.polls import bad_script_data
from core import keys
from core.codec import Event
from core.connections import open_producer, open_redis
from core.packing import unpacked
from core.settings import Settings
from tests.conftest import PrivateRedis, eventually, free_port
from tests.helpers import read_topic
from tests.test_consumers_support import committed, make_spec, new_batch, options, running, unique

STEPS = ("extract", "transform", "load")


@dataclass
class Stream:
    """Events of a few batches on the test's topics and what each batch must end as."""

    settings: Settings
    redis: Redis
    pipeline_id: str = field(default_factory=lambda: unique("faults"))
    batch_ids: list[str] = field(default_factory=list)
    sent: int = 0

    def event(self, batch_id: str, kind: str, **fields: Any) -> Event:
        return Event(type=kind, batch_id=batch_id, pipeline_id=self.pipeline_id, **fields)

    async def publish(self, per_batch: Callable[[str], list[Event]],
                      producer: AIOKafkaProducer | None = None) -> int:
        events = [e for b in self.batch_ids for e in per_batch(b)]
        own = producer is None
        if producer is None:
            producer = await open_producer(self.settings)
        try:
            futures = [await producer.send(self.settings.topic_events, value=e.encode(),
                                           key=e.batch_id.encode()) for e in events]
            await asyncio.gather(*futures)
        finally:
            if own:
                await producer.stop()
        self.sent += len(events)
        return self.sent

    async def committed(self) -> int:
        return await committed(self.settings, self.settings.group_events,
                               self.settings.topic_events)

    async def all_committed(self) -> None:
        async def done() -> bool:
            return await self.committed() >= self.sent
        await eventually(done, timeout=30, interval=0.1)


async def dead_letters(settings: Settings) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    try:
        tp = TopicPartition(settings.topic_dlq, 0)
        return int((await consumer.end_offsets([tp]))[tp])
    finally:
        await consumer.stop()


async def held_while(consumer: EventsConsumer, stream: Stream, before: int,
                     fault: str) -> None:
    """While the fault lasts: the consumer keeps retrying the poll (it met the fault at least
    twice), commits nothing past the events it applied before, dead-letters nothing."""
    retries = consumer.backoff.retries

    async def retried() -> bool:
        return consumer.backoff.retries >= retries + 2
    await eventually(retried, timeout=20)
    assert await stream.committed() == before, f"committed past the events during {fault}"
    assert consumer.dead == 0 and await dead_letters(stream.settings) == 0, fault


async def wait_out(consumer: EventsConsumer, stream: Stream, fault: str,
                   on: Callable[[], Awaitable[object]], off: Callable[[], Awaitable[object]],
                   events: Callable[[str], list[Event]]) -> None:
    before = stream.sent
    await stream.all_committed()
    await on()
    try:
        await stream.publish(events)
        await held_while(consumer, stream, before, fault)
    finally:
        await off()
    await stream.all_committed()


async def test_readonly_oom_and_busy_redis_are_waited_out_with_nothing_lost(
        topics: Settings, private_redis: PrivateRedis) -> None:
    settings = topics.model_copy(update={"redis_url": private_redis.url})
    admin = await open_redis(settings)
    stream = Stream(settings, admin)
    spec = make_spec(stream.pipeline_id)
    stream.batch_ids = [await new_batch(admin, settings, stream.pipeline_id, spec)
                        for _ in range(8)]
    ev = stream.event

    def offsets(step: str, top: int) -> Callable[[str], list[Event]]:
        # Older offsets re-sent after newer ones, as a restarted step does.
        return lambda b: [ev(b, "step.offsets", step=step, offsets={"p0": n, "p1": n // 2})
                          for n in (*range(top - 20, top + 1), top - 5)]

    consumer = EventsConsumer(settings, options())
    busy = Redis(port=private_redis.port, socket_timeout=30)
    try:
        async with running(consumer):
            await stream.publish(lambda b: [
                ev(b, "batch.state", state="scheduled", flow_run_id=str(uuid.uuid5(uuid.NAMESPACE_URL, b))),
                ev(b, "batch.state", state="running"),
                ev(b, "step.state", step="extract", state="running"),
                *offsets("extract", 40)(b)])

            # A failover leaves this node a replica: every write answers READONLY.
            closed = free_port()
            await wait_out(
                consumer, stream, "READONLY",
                lambda: admin.replicaof("127.0.0.1", closed),
                lambda: admin.replicaof("NO", "ONE"),
                lambda b: [*offsets("extract", 100)(b),
                           ev(b, "step.state", step="extract", state="success"),
                           ev(b, "step.state", step="transform", state="running")])

            # A full server with noeviction: every write answers OOM.
            await admin.config_set("maxmemory-policy", "noeviction")
            await wait_out(
                consumer, stream, "OOM",
                lambda: admin.config_set("maxmemory", "1"),
                lambda: admin.config_set("maxmemory", "0"),
                lambda b: [*offsets("transform", 70)(b),
                           ev(b, "step.state", step="transform", state="success"),
                           ev(b, "step.state", step="load", state="running")])

            # A long script of someone else's: every call answers BUSY until it ends.
            await admin.config_set("busy-reply-threshold", "20")
            spin = busy.eval("local t = redis.call('TIME') "
                             "while true do local n = redis.call('TIME') "
                             "if (n[1] - t[1]) * 1000000 + (n[2] - t[2]) > 3000000 then "
                             "return 1 end end", 0)
            spinning = asyncio.ensure_future(spin)

            async def spin_started() -> bool:
                with contextlib.suppress(Exception):
                    await admin.ping()
                    return False
                return True

            async def spin_over() -> None:
                await spinning

            await wait_out(
                consumer, stream, "BUSY", lambda: eventually(spin_started, timeout=5),
                spin_over,
                lambda b: [*offsets("load", 30)(b),
                           ev(b, "step.state", step="load", state="success"),
                           ev(b, "batch.state", state="stop", outcome="completed")])
        assert consumer.dead == 0 and await dead_letters(settings) == 0
        assert consumer.applied == stream.sent
        for batch_id in stream.batch_ids:
            fields = unpacked(cast(dict[str, str],
                                   await admin.hgetall(keys.batch(stream.pipeline_id, batch_id))))
            assert (fields["state"], fields["outcome"], fields["flow_run_id"]) == (
                "stop", "completed", str(uuid.uuid5(uuid.NAMESPACE_URL, batch_id)))
            for step, top in zip(STEPS, (100, 70, 30), strict=True):
                assert fields[f"step:{step}"] == "success"
                assert (fields[f"off:{step}:p0"], fields[f"off:{step}:p1"]) == (
                    str(top), str(top // 2))
    finally:
        await busy.aclose()
        await admin.aclose()


async def test_only_a_batch_whose_data_breaks_the_script_is_dead_lettered(
        topics: Settings, private_redis: PrivateRedis) -> None:
    """A permanent script error (here WRONGTYPE: the batch's dedup key is not a zset) sends the
    poll batch by batch: that batch's records go to the dead letters with the reason, the
    others are applied. Redis turning read-only meanwhile still only delays them all."""
    settings = topics.model_copy(update={"redis_url": private_redis.url})
    admin = await open_redis(settings)
    stream = Stream(settings, admin)
    spec = make_spec(stream.pipeline_id)
    stream.batch_ids = [await new_batch(admin, settings, stream.pipeline_id, spec)
                        for _ in range(4)]
    broken = stream.batch_ids[1]
    await admin.set(keys.batch_seen(stream.pipeline_id, broken), "not a zset")
    ev = stream.event

    def lifecycle(b: str) -> list[Event]:
        return [ev(b, "batch.state", state="running"),
                ev(b, "step.offsets", step="extract", offsets={"p0": 7}),
                ev(b, "step.state", step="extract", state="success")]

    consumer = EventsConsumer(settings, options())
    try:
        async with running(consumer):
            await wait_out(
                consumer, stream, "READONLY with a broken batch",
                lambda: admin.replicaof("127.0.0.1", free_port()),
                lambda: admin.replicaof("NO", "ONE"), lifecycle)
        dead = await read_topic(settings, settings.topic_dlq, lambda r: len(r) >= 3)
        assert len(dead) == 3 and {r.key for r in dead} == {broken.encode()}
        reasons = {dict(r.headers)[dlq.REASON].decode() for r in dead}
        assert len(reasons) == 1 and "WRONGTYPE" in reasons.pop()
        assert consumer.dead == 3 and await dead_letters(settings) == 3
        for batch_id in stream.batch_ids:
            fields = await admin.hgetall(keys.batch(stream.pipeline_id, batch_id))
            expected = ("pending", "none") if batch_id == broken else ("running", "success")
            assert (fields["state"], fields["step:extract"]) == expected
            assert fields.get("off:extract:p0") == (None if batch_id == broken else "7")
    finally:
        await admin.aclose()


@pytest.mark.parametrize("reply", [
    "READONLY You can't write against a read only replica.",
    "OOM command not allowed when used memory > 'maxmemory'.",
    "LOADING Redis is loading the dataset in memory",
    "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
    "TRYAGAIN Multiple keys request during rehashing of slot",
    "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
    "CLUSTERDOWN The cluster is down",
])
def test_redis_not_taking_writes_is_never_taken_for_bad_data(reply: str) -> None:
    """The replies the servers above sent, as redis-py raises them: none may reach the dead
    letters (they are `UNAVAILABLE`, waited out by `Backoff`)."""
    assert not bad_script_data(_parsed_error(reply))


@pytest.mark.parametrize("reply", [
    "WRONGTYPE Operation against a key holding the wrong kind of value",
    "ERR user_script:40: attempt to compare nil with number script: 1234, on @user_script:40.",
])
def test_a_script_error_about_the_data_goes_batch_by_batch(reply: str) -> None:
    assert bad_script_data(_parsed_error(reply))


def _parsed_error(reply: str) -> ResponseError:
    """The exception redis-py raises for an error reply (its parser is not typed)."""
    parser: Any = _AsyncRESP2Parser(1 << 16)
    return cast(ResponseError, parser.parse_error(reply))


async def test_a_flowing_stream_survives_repeated_failovers_and_a_full_redis(
        topics: Settings, private_redis: PrivateRedis) -> None:
    """Offsets events keep arriving (with older ones re-sent after newer) while Redis flips
    to read-only and back three times, then fills up once: each fault holds the commit where
    it is, and at the end every batch holds the highest offsets sent, none dead-lettered."""
    settings = topics.model_copy(update={"redis_url": private_redis.url})
    admin = await open_redis(settings)
    stream = Stream(settings, admin)
    spec = make_spec(stream.pipeline_id)
    stream.batch_ids = [await new_batch(admin, settings, stream.pipeline_id, spec)
                        for _ in range(20)]
    flowing = True

    def round_of(n: int) -> Callable[[str], list[Event]]:
        return lambda b: [stream.event(b, "step.offsets", step="extract",
                                       offsets={"p0": n, "p1": 2 * n}),
                          stream.event(b, "step.offsets", step="extract",
                                       offsets={"p0": max(n - 7, 0)})]

    async def produce() -> int:
        """Rounds until the faults are over (so each lands mid-stream), then one more."""
        producer = await open_producer(settings)
        n = 0
        try:
            while flowing or n < 2:
                n += 1
                await stream.publish(round_of(n), producer)
                await asyncio.sleep(0.05)
        finally:
            await producer.stop()
        return n

    async def hold(fault: str) -> None:
        first = consumer.backoff.retries + 1

        async def met(times: int) -> bool:
            return consumer.backoff.retries >= first + times
        await eventually(lambda: met(0), timeout=20)
        # A flush started before the fault (of polls applied before it; its snapshots only
        # read Redis) may still commit them: legitimately, and late on a loaded machine. No
        # other flush starts while the fault holds the apply, so once that one is done the
        # commit must stay where it is.
        await eventually(lambda: consumer.stages.flushing is None
                         or consumer.stages.flushing.done(), timeout=20)
        held_at = await stream.committed()
        await eventually(lambda: met(3), timeout=20)
        assert await stream.committed() == held_at, f"committed past the events during {fault}"
        assert consumer.dead == 0, fault

    async def moving() -> None:
        before = await stream.committed()

        async def advanced() -> bool:
            return await stream.committed() > before
        await eventually(advanced, timeout=20)

    consumer = EventsConsumer(settings, options())
    try:
        async with running(consumer):
            producer = asyncio.create_task(produce())
            try:
                await moving()
                for _ in range(3):
                    await admin.replicaof("127.0.0.1", free_port())
                    try:
                        await hold("READONLY")
                    finally:
                        await admin.replicaof("NO", "ONE")
                    await moving()
                await admin.config_set("maxmemory-policy", "noeviction")
                await admin.config_set("maxmemory", "1")
                try:
                    await hold("OOM")
                finally:
                    await admin.config_set("maxmemory", "0")
                flowing = False
                rounds = await producer
            finally:
                producer.cancel()
            assert stream.sent == rounds * 2 * len(stream.batch_ids)
            await stream.all_committed()
        assert consumer.dead == 0 and await dead_letters(settings) == 0
        assert consumer.applied == stream.sent
        for batch_id in stream.batch_ids:
            fields = await admin.hgetall(keys.batch(stream.pipeline_id, batch_id))
            assert (fields["off:extract:p0"], fields["off:extract:p1"]) == (
                str(rounds), str(2 * rounds))
    finally:
        await admin.aclose()
