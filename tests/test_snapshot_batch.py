"""The events consumer's batched snapshots (`consumers/plumbing/snapshot_batch.py`) on real
Redis and Kafka: the same records `core.snapshots` writes, on the partition `send()` picks for
the key (compaction keeps one record per key and partition), deleted and missing batches
skipped; and the delete job's purge tombstones the batch's snapshot, so a rebuild does not
bring it back."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka.structs import ConsumerRecord
from redis.asyncio import Redis

from consumers.plumbing import snapshot_batch
from consumers.plumbing.active import ActiveRuns
from consumers.plumbing.cleanup import Cleanup
from consumers.plumbing.prefect_api import PrefectGateway
from consumers.plumbing.snapshot_batch import SnapshotBatches
from consumers.rebuild_read import read_snapshots
from core import keys
from core.codec import Event
from core.connections import open_producer
from core.settings import Settings
from core.snapshots import NOT_SNAPSHOTTED, Snapshot, SnapshotWriter, snapshot_key
from tests.conftest import PrivateRedis
from tests.helpers import read_topic, spec
from tests.test_consumers_support import new_batch, options, store_for, unique


async def _batches(redis: Redis, settings: Settings, pipeline_id: str, n: int) -> list[str]:
    ids = [await new_batch(redis, settings, pipeline_id, spec()) for _ in range(n)]
    store = store_for(redis, settings)
    # A state event (its id remembered: `seen_n` in the hash, never snapshotted) and offsets.
    await store.apply([e for i, b in enumerate(ids) for e in (
        Event(type="step.state", batch_id=b, pipeline_id=pipeline_id, event_id=f"s{i}",
              step="extract", state="running"),
        Event(type="step.offsets", batch_id=b, pipeline_id=pipeline_id, step="extract",
              offsets={"0": i, "p1": 2**53 - i}))])
    # A free text with what JSON must escape (Redis's cjson encodes it, orjson decodes it).
    await store.apply([Event(type="batch.state", batch_id=ids[0], pipeline_id=pipeline_id,
                             event_id="stop", state="stop", outcome="failed",
                             reason='disk/full: "é" \\ \n\t\u0001 ✓')])
    return ids


@pytest.mark.parametrize("builder_bytes", [snapshot_batch.BUILDER_BYTES, 3_000])
async def test_batched_snapshots_equal_the_writers_on_the_same_partitions(
        topics: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch,
        builder_bytes: int) -> None:
    # 3,000 bytes: a few snapshots a builder, so a partition's records span several batches.
    monkeypatch.setattr(snapshot_batch, "BUILDER_BYTES", builder_bytes)
    ids = await _batches(redis, topics, "p-a", 30) + await _batches(redis, topics, "p-b", 5)
    pairs = [("p-a", b) for b in ids[:30]] + [("p-b", b) for b in ids[30:]]
    hidden = pairs[3]
    assert await store_for(redis, topics).hide(*hidden)
    hashes: dict[tuple[str, str], dict[str, str]] = {
        p: await redis.hgetall(keys.batch(*p)) for p in pairs}  # type: ignore[misc]
    assert sum("seen_n" in h for h in hashes.values()) >= 30  # left out of every record
    producer = await open_producer(topics)
    try:
        # The record `send()` writes, one per batch, tells its partition.
        writer = SnapshotWriter(producer, redis, topics.topic_snapshots)
        for p in pairs:
            await writer.write(*p, hashes[p])
        written = await SnapshotBatches(producer, redis, topics.topic_snapshots).write_current(
            [*pairs, ("p-a", "batch-missing")])
    finally:
        await producer.stop()
    assert written == len(pairs) - 1  # the hidden batch and the missing one skipped

    def both(records: list[ConsumerRecord[bytes, bytes]]) -> bool:
        return len(records) >= 2 * len(pairs) - 1
    records = await read_topic(topics, topics.topic_snapshots, both)
    by_key: dict[bytes, list[ConsumerRecord[bytes, bytes]]] = {}
    for record in records:
        by_key.setdefault(record.key, []).append(record)
    for p in pairs:
        mine = by_key[snapshot_key(*p)]
        assert len(mine) == (1 if p == hidden else 2), p
        assert len({r.partition for r in mine}) == 1, p  # one key, one partition
        old, new = (Snapshot.decode(r.value) for r in (mine[0], mine[-1]))
        assert new == old
        assert (new.pipeline_id, new.batch_id) == p
        assert new.fields == {k: v for k, v in hashes[p].items() if k not in NOT_SNAPSHOTTED}
    assert len(records) == 2 * len(pairs) - 1


async def test_a_purged_batchs_snapshot_is_tombstoned(topics: Settings, redis: Redis) -> None:
    pipeline_id = unique("p-purge")
    batch_id, kept_id = await _batches(redis, topics, pipeline_id, 2)
    producer = await open_producer(topics)
    opts = options(cleanup_recheck_s=0.0)
    gateway = PrefectGateway(topics, opts.prefect_timeout_s)
    await gateway.open()
    try:
        writer = SnapshotWriter(producer, redis, topics.topic_snapshots)
        assert await writer.write_current([(pipeline_id, batch_id), (pipeline_id, kept_id)]) == 2
        assert await store_for(redis, topics).hide(pipeline_id, batch_id)  # the API's delete
        cleanup = Cleanup(redis, gateway, store_for(redis, topics), ActiveRuns(redis), opts,
                          asyncio.Event(), snapshots=writer)
        assert await cleanup.one_pass("delete", pipeline_id, batch_id, time.time() - 1) is None
        assert not await redis.exists(keys.batch(pipeline_id, batch_id))
    finally:
        await gateway.close()
        await producer.stop()
    # What a rebuild reads: the purged batch is gone, the other kept.
    assert [s.batch_id for s in await read_snapshots(topics)] == [kept_id]


async def test_scripts_lost_by_redis_are_loaded_again(
        topics: Settings, private_redis: PrivateRedis) -> None:
    # A server of its own: SCRIPT FLUSH empties every database's scripts, under the other
    # tests running meanwhile too (`make test` runs two files at once).
    topics = topics.model_copy(update={"redis_url": private_redis.url})
    redis = Redis.from_url(private_redis.url, decode_responses=True)
    ids = await _batches(redis, topics, "p-noscript", 2)
    producer = await open_producer(topics)
    try:
        writer = SnapshotBatches(producer, redis, topics.topic_snapshots)
        assert await writer.write_current([("p-noscript", b) for b in ids]) == 2
        await redis.script_flush()  # as after a restart of Redis
        assert await writer.write_current([("p-noscript", b) for b in ids]) == 2
    finally:
        await producer.stop()
        await redis.aclose()
