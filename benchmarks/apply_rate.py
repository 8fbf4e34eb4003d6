"""bench-e2e's third measurement: the events consumer's sustained apply rate on a realistic
stream (duplicates, older offsets, state changes), next to a group-less aiokafka read of the
same records (the anchor)."""

from __future__ import annotations

import asyncio
import gc
import random
import time
import uuid
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from redis.asyncio import Redis

from benchmarks.harness import redis_cpu_seconds
from consumers.events import EventsConsumer
from consumers.plumbing import collector
from consumers.plumbing.options import ConsumerOptions
from core.codec import Event
from core.connections import open_producer, open_redis
from core.models import PipelineSpec, StepSpec, new_batch_id
from core.scripts import Scripts
from core.settings import Settings
from core.store import BatchStore

DUPLICATES = 0.10  # a record delivered again (same event id): a producer retry, a replay
OLDER = 0.10  # an offset lower than one already sent (a step's late or re-sent progress)
STATES = 0.02  # step state events among the offsets, duplicated like the rest
# Rounds of (raw read, consumer), the median round's ratio reported. One round's two phases
# last a second or two each: a neighbour's burst on a shared machine moved a single round's
# ratio by 10 points, the same code measuring 37% and 54% in one series; the median of
# rounds measured back to back is what the code does, not when the burst came.
ROUNDS = 5


def stream(batches: list[str], pipeline_id: str, steps: list[str], total: int) -> list[Event]:
    """`total` events as the events topic carries them in real life: mostly rising offsets,
    with duplicates of earlier records, older offsets and state changes mixed in (seeded, so
    every run reads the same stream)."""
    rng = random.Random(9)
    out: list[Event] = []
    step_rank = ("pending", "running", "success")
    for n in range(total):
        batch_id = batches[n % len(batches)]
        roll = rng.random()
        if out and roll < DUPLICATES:
            out.append(out[rng.randrange(max(0, len(out) - 5_000), len(out))])
        elif roll < DUPLICATES + OLDER:
            out.append(Event("step.offsets", batch_id, pipeline_id, step=steps[n % 3],
                             offsets={f"partition_{n % 4}": max(0, n - rng.randrange(1, 50_000))}))
        elif roll < DUPLICATES + OLDER + STATES:
            out.append(Event("step.state", batch_id, pipeline_id, step=rng.choice(steps),
                             state=rng.choice(step_rank)))
        else:
            out.append(Event("step.offsets", batch_id, pipeline_id, step=steps[n % 3],
                             offsets={f"partition_{n % 4}": n}))
    return out

@dataclass
class Rates:
    """Events/s of the consumer and of the raw read (steady state), and the CPU each took in
    this process per event (µs): the CPU figures hardly move with the machine's other load."""

    apply: float
    raw: float
    apply_cpu_us: float
    raw_cpu_us: float
    # Redis's CPU per event over the same run (INFO cpu, all its clients: the machine's other
    # load too, so an upper bound): what the consumer asks of Redis, its scripts included.
    redis_cpu_us: float = 0.0
    # Every round's consumer/raw ratio, lowest first (these figures are the median round's).
    ratios: list[float] = field(default_factory=list)


def _settle_heap() -> None:
    """Before a timed phase: what the set-up left (the events built and sent, the
    raw read's records) collected and frozen out of the collector's reach. Otherwise every
    full collection walks it (~100 ms each, some 15 a run), and which phase one lands in
    decides the ratio: a long-lived consumer process has no such heap."""
    gc.collect()
    gc.freeze()


async def apply_rate(settings: Settings, total: int, redis_db: int) -> Rates:
    base = settings.redis_url.rsplit("/", 1)[0]
    tag = uuid.uuid4().hex[:8]
    topic = f"bench.{tag}.events"
    # Snapshots on a topic of the run's own (compacted, as the stack's): its fake batches
    # must not land on the shared batches.snapshots, which a `make rebuild` would restore.
    snapshots = f"bench.{tag}.snapshots"
    bench = settings.model_copy(update={"redis_url": f"{base}/{redis_db}", "topic_events": topic,
                                        "topic_snapshots": snapshots,
                                        "topic_pipelines": f"bench.{tag}.pipelines",
                                        "group_events": f"bench-{tag}"})
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    await admin.create_topics([
        NewTopic(topic, 6, 1),
        NewTopic(snapshots, settings.snapshots_partitions, 1,
                 topic_configs={"cleanup.policy": "compact"})])
    redis = await open_redis(bench)
    await redis.flushdb()
    store = BatchStore(redis, Scripts(redis), token_secret=b"unused")
    spec = PipelineSpec(name="bench-apply", version="1",
                        steps=[StepSpec(name=s, uses="sales." + s) for s in ("extract", "transform", "load")])
    batches = [new_batch_id() for _ in range(1000)]
    for batch_id in batches:
        await store.create("bench-apply", batch_id, spec)
    producer = await open_producer(bench, linger_ms=20, max_batch_size=1 << 20)
    try:
        futures = []
        for record in stream(batches, "bench-apply", [s.name for s in spec.steps], total):
            futures.append(await producer.send(topic, record.encode(),
                                               key=record.batch_id.encode()))
        await asyncio.gather(*futures)
        del futures  # a record metadata per event, which nobody reads
    finally:
        await producer.stop()
    # The consumers process's collector policy (`python -m consumers` sets it at start), for
    # both phases: the raw read gains from it too, and the ratio compares like with like.
    collector.settle(ConsumerOptions().gc_young_objects)
    try:
        rounds = []
        for n in range(ROUNDS):
            raw_rate, raw_cpu = await _raw_read(settings, topic, total)
            if n:  # the batches as the first round found them: every round does the same work
                await redis.flushdb()
                for batch_id in batches:
                    await store.create("bench-apply", batch_id, spec)
            apply, apply_cpu, redis_cpu = await _consume(
                bench.model_copy(update={"group_events": f"bench-{tag}-{n}"}), redis, total)
            rounds.append(Rates(apply, raw_rate, apply_cpu, raw_cpu, redis_cpu))
    finally:
        await redis.flushdb()
        await redis.aclose()
        await admin.delete_topics([topic, snapshots])
        await admin.close()
    rounds.sort(key=lambda r: r.apply / r.raw)
    median = rounds[len(rounds) // 2]
    median.ratios = [r.apply / r.raw for r in rounds]
    return median


async def _raw_read(settings: Settings, topic: str, total: int) -> tuple[float, float]:
    """The anchor: a group-less aiokafka read of the topic from its start. Events/s, and
    this process's CPU µs per event."""
    _settle_heap()
    raw = AIOKafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap,
                           auto_offset_reset="earliest", enable_auto_commit=False,
                           max_partition_fetch_bytes=8 << 20, fetch_max_bytes=64 << 20)
    # Both rates are steady-state ones: from the end of the first poll that returned records
    # to the last record (joining the group and the first fetch are start-up, not rate).
    await raw.start()
    try:
        seen, first = 0, None
        while seen < total:
            for records in (await raw.getmany(timeout_ms=200, max_records=20_000)).values():
                seen += len(records)
            if seen and first is None:
                first = (time.perf_counter(), seen)
                cpu0 = time.process_time()
        assert first is not None
        rate = (total - first[1]) / max(time.perf_counter() - first[0], 1e-6)
        return rate, (time.process_time() - cpu0) * 1e6 / (total - first[1])
    finally:
        await raw.stop()


async def _consume(settings: Settings, redis: Redis, total: int) -> tuple[float, float, float]:
    """The events consumer of a new group reading the topic from its start, until every
    event is applied, dropped or dead-lettered: events/s, this process's CPU µs per event
    and Redis's."""
    _settle_heap()
    consumer = EventsConsumer(settings)
    await consumer.start()
    task = asyncio.create_task(consumer.run())
    first = None
    while (done := consumer.applied + consumer.dropped + consumer.dead) < total:
        if task.done():
            task.result()
        if done and first is None:
            first = (time.perf_counter(), done)
            cpu0, redis_cpu0 = time.process_time(), await redis_cpu_seconds(redis)
        await asyncio.sleep(0.002)
    assert first is not None
    rate = (total - first[1]) / max(time.perf_counter() - first[0], 1e-6)
    cpu = (time.process_time() - cpu0) * 1e6 / (total - first[1])
    redis_cpu = (await redis_cpu_seconds(redis) - redis_cpu0) * 1e6 / (total - first[1])
    await consumer.stop()
    await task
    return rate, cpu, redis_cpu
