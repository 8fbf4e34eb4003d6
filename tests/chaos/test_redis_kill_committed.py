"""Issue 12, part 5: Redis SIGKILLed during a stream loses no event the events consumer
committed.

Every event of the stream writes a field no other event writes (its own partition name), so
an event whose effect Redis lost cannot be hidden by a later one (offsets are kept by max:
a lost value in a series the stream goes on raising would not show). The events consumer
commits a poll only after Redis answered its scripts, and the stack's Redis answers a write
only once it is fsynced to its append-only file (`appendfsync always`,
deploy/local/parts/redis.py): an event before the committed offset is on disk, so after the
restart every event shows, the committed ones from the AOF and the others applied again from
the committed offset. The committed offset's advance during the stream is read at the kill,
so the scenario checks committed events, not only events read again.

What a kill cannot show: Redis write()s its AOF before it answers under `everysec` too, and
the page cache outlives a killed process, so this scenario lost nothing with `everysec` either
(run once so: 3,000 events committed before the kill, none missing). `always` adds the fsync,
which only a machine crash tells apart (or a kill while a slow fsync postpones the writes):
the setting is asserted as well.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import Redis

from core import keys
from core.settings import Settings
from tests.chaos.stackctl import ChaosStack
from tests.chaos.streams import event, seed_batches, send
from tests.chaos.watch import report

BATCHES = 10
EVENTS = 6_000
RATE = 1_500.0
KILL_AFTER_S = 2.0
DOWN_S = 2.0
SETTLE_S = 90.0


async def committed(settings: Settings) -> int:
    """The events group's committed offsets, summed over the events topic's partitions."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(settings.group_events)
    finally:
        await admin.close()
    return sum(meta.offset for tp, meta in offsets.items()
               if tp.topic == settings.topic_events and meta.offset >= 0)


async def missing(redis: Redis, pipeline_id: str, expected: dict[str, set[str]]) -> int:
    """How many events' fields are not (yet) in their batch's hash."""
    gone = 0
    for batch_id, fields in expected.items():
        held = set(await redis.hkeys(keys.batch(pipeline_id, batch_id)))
        gone += len(fields - held)
    return gone


@pytest.mark.timeout(240)
async def test_redis_killed_mid_stream_keeps_every_committed_event(
        chaos: ChaosStack, chaos_redis: Redis) -> None:
    settings = chaos.settings
    pipeline_id, batch_ids = await seed_batches(chaos_redis, settings, "chaos-durable", BATCHES,
                                                steps=("extract",))
    records: list[tuple[str, bytes]] = []
    expected: dict[str, set[str]] = {b: set() for b in batch_ids}
    for n in range(EVENTS):
        batch_id = batch_ids[n % BATCHES]
        records.append((batch_id, event("step.offsets", pipeline_id, batch_id, step="extract",
                                        offsets={f"u{n}": n + 1})))
        expected[batch_id].add(f"off:extract:u{n}")
    before = await committed(settings)
    fault: dict[str, float] = {}

    async def kill_and_restart() -> None:
        await asyncio.sleep(KILL_AFTER_S)
        fault["killed"] = await asyncio.to_thread(chaos.kill, "redis")
        fault["committed_at_kill"] = await committed(settings) - before
        await asyncio.sleep(DOWN_S)
        fault["restart_s"] = await asyncio.to_thread(chaos.up, "redis")

    task = asyncio.create_task(kill_and_restart())
    try:
        sent_s = await send(settings, records, RATE)
    finally:
        await task
    # The harness's client held connections to the killed server: new ones from here on.
    await chaos_redis.connection_pool.disconnect()
    fsync = (await chaos_redis.config_get("appendfsync"))["appendfsync"]
    deadline = time.monotonic() + SETTLE_S
    while (left := await missing(chaos_redis, pipeline_id, expected)) and (
            time.monotonic() < deadline):
        await asyncio.sleep(0.5)
    report("Redis SIGKILLed mid-stream: committed events kept",
           stream=f"{EVENTS} events, one field each, over {BATCHES} batches in {sent_s:.1f}s",
           appendfsync=fsync,
           events_committed_before_the_kill=int(fault["committed_at_kill"]),
           redis_up_again_in=f"{fault['restart_s']:.1f}s",
           events_missing_after_settle=left)
    assert fsync == "always", "the stack's Redis does not fsync before answering"
    assert fault["committed_at_kill"] > 0, "nothing was committed before the kill: no proof"
    assert left == 0, f"{left} events missing after Redis's restart"
