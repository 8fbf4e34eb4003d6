"""Untrue answers after a rebuild (`consumers.rebuild`, `core.restore`): what a rebuilt Redis
answers must be what the API answered before the loss, whatever the topics and the database
written into hold."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions
from aiokafka.partitioner import DefaultPartitioner
from redis.asyncio import Redis

from consumers.rebuild import NotEmpty, rebuild
from consumers.rebuild_read import SnapshotsRead, current_partition, read_snapshots, read_whole, reordered
from core import keys
from core.command_messages import Command, Recorded
from core.connections import open_producer
from core.paging import Pager
from core.registry import PipelineRegistry
from core.restore import Restored, restore_batches
from core.restore_runs import from_run_commands
from core.scripts import Scripts
from core.settings import Settings
from core.snapshots import (
    NOT_SNAPSHOTTED,
    PipelineVersion,
    Snapshot,
    pipeline_key,
    pipeline_record,
    snapshot_key,
    snapshot_record,
)
from core.store import BatchStore
from tests.helpers import spec
from tests.test_commands_published import command as published_command
from tests.test_consumers_support import send, unique
from tests.test_store_packing import PARTS, P, ev, lifecycle, raw


@pytest.fixture
async def store(redis: Redis, scripts: Scripts) -> BatchStore:
    return BatchStore(redis, scripts, token_secret=b"secret", dedup_window=4)


async def test_a_forced_restore_over_an_older_hash_answers_the_snapshot_alone(
        store: BatchStore, redis: Redis, scripts: Scripts) -> None:
    """`rebuild --force` over older data (a backup, an AOF that lost its last second): the
    restored hash was written field by field over the older one, never cleared. The older
    running batch's plain offsets stayed beside the snapshot's packed form, and a packed
    hash's plain fields win over its packed copies: GET showed a completed batch at the
    offsets it had while running."""
    batch_id = "b-older"
    await store.create(P, batch_id, spec())
    events = lifecycle(batch_id)
    half = {part: 1 for part in PARTS}
    running = [*events[:3], ev(batch_id, "step.offsets", step="extract", offsets=half)]
    await store.apply(running)
    older = await raw(redis, batch_id)
    await store.apply(events[3:])
    newer = await raw(redis, batch_id)
    answered = await store.get(P, batch_id)
    assert answered is not None and answered["outcome"] == "completed"
    pager = Pager(redis, scripts, b"secret")
    await redis.flushdb()
    await restore_batches(redis, store, pager, [Snapshot(P, batch_id, older)], set(), Restored())
    await restore_batches(redis, store, pager, [Snapshot(P, batch_id, newer)], set(), Restored())
    assert await store.get(P, batch_id) == answered
    # A running batch's de-duplication counter (not snapshotted) stays beside its seen ids.
    await redis.flushdb()
    await store.create(P, batch_id, spec())
    await store.apply(running)
    seen_n = (await raw(redis, batch_id))["seen_n"]
    snapshotted = {k: v for k, v in older.items() if k not in NOT_SNAPSHOTTED}
    await restore_batches(redis, store, pager, [Snapshot(P, batch_id, snapshotted)], set(),
                          Restored())
    assert (await raw(redis, batch_id)).get("seen_n") == seen_n



async def test_a_batch_deleted_during_a_forced_restore_stays_deleted(
        store: BatchStore, redis: Redis, scripts: Scripts) -> None:
    """`rebuild --force` with the API still answering: a DELETE hides the batch (no snapshot
    is ever taken of a hidden one), then the restore writes its snapshot over the hash. The
    restored hash is the snapshot's, and `deleted` is not in it: the deleted batch was back
    in GET and in the list until its clean-up purged it."""
    await store.create(P, "b", spec())
    fields = {k: v for k, v in (await raw(redis, "b")).items() if k not in NOT_SNAPSHOTTED}
    assert await store.hide(P, "b")
    await restore_batches(redis, store, Pager(redis, scripts, b"secret"),
                          [Snapshot(P, "b", fields)], set(), Restored())
    assert await store.get(P, "b") is None
    assert list((await store.page(P, 10, None)).items) == []
    assert await redis.zscore(keys.batch_index(P), "b") is None

def _moved_ids(pipeline_id: str, prefix: str) -> list[str]:
    """Two batch ids whose snapshot keys move when the topic grows from 2 partitions to 3: one
    to a lower partition, one to a higher (whatever order the partitions are read in, one of
    them has its record from after the raise read before its older one)."""
    out: dict[bool, str] = {}
    for n in range(10_000):
        batch_id = f"{prefix}-{n}"
        key = snapshot_key(pipeline_id, batch_id)
        old = DefaultPartitioner()(key, [0, 1], [0, 1])
        new = DefaultPartitioner()(key, [0, 1, 2], [0, 1, 2])
        if old != new:
            out.setdefault(new < old, batch_id)
        if len(out) == 2:
            return list(out.values())
    raise AssertionError("no such ids")


async def test_a_batch_purged_after_the_snapshots_topic_grew_stays_purged(
        topics: Settings) -> None:
    """Partitions added to the snapshots topic move keys: a batch's snapshots before the raise
    stay on its old partition (compaction keeps their last there), its tombstone and later
    snapshots go to its new one. Of one key's records on two partitions the rebuild kept the
    higher `rev` whatever came after it, or the last one read: the purged batch came back
    (its tombstone has no rev), and an id reused after its purge (a published id, its claim
    expired) was restored as its earlier batch, listed with its old state and sequence."""
    p = unique("test-grown")
    purged_ids, reused_ids = _moved_ids(p, "purged"), _moved_ids(p, "reused")
    before = await open_producer(topics)
    try:
        for batch_id in purged_ids + reused_ids:
            await before.send_and_wait(topics.topic_snapshots, snapshot_record(
                p, batch_id, {"id": batch_id, "state": "running", "rev": "9", "seq": "1"}),
                key=snapshot_key(p, batch_id))
    finally:
        await before.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=topics.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_partitions({topics.topic_snapshots: NewPartitions(3)})
    finally:
        await admin.close()
    after = await open_producer(topics)
    try:
        for batch_id in purged_ids + reused_ids:
            await after.send_and_wait(topics.topic_snapshots, None,
                                      key=snapshot_key(p, batch_id))
        for batch_id in reused_ids:
            await after.send_and_wait(topics.topic_snapshots, snapshot_record(
                p, batch_id, {"id": batch_id, "state": "pending", "rev": "1", "seq": "2"}),
                key=snapshot_key(p, batch_id))
    finally:
        await after.stop()
    purged: set[tuple[str, str]] = set()
    held = {s.batch_id: s.fields for s in await read_snapshots(topics, purged)}
    assert [b for b in purged_ids if b in held] == [], "a purged batch was restored"
    assert {(p, b) for b in purged_ids} <= purged
    assert [held.get(b, {}).get("seq") for b in reused_ids] == ["2", "2"], (
        "a reused id restored as its earlier batch")


def _record(partition: int, offset: int, key: bytes, value: bytes | None,
            timestamp: int) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("snapshots", partition, offset, timestamp, 0, key, value, None,
                          len(key), len(value or b""), [])


@pytest.mark.parametrize("reverse", [False, True])
def test_a_keys_records_on_several_partitions_go_by_where_it_goes_now(reverse: bool) -> None:
    """The same without Kafka, in either order of the partitions' reading."""
    p = "p"
    purged_id, reused_id = _moved_ids(p, "purged")[0], _moved_ids(p, "reused")[0]
    purged_key, reused_key = snapshot_key(p, purged_id), snapshot_key(p, reused_id)
    old, new = (DefaultPartitioner()(purged_key, [0, 1], [0, 1]),
                DefaultPartitioner()(purged_key, [0, 1, 2], [0, 1, 2]))
    # A clock behind the old partition's producer's: timestamps alone would not do.
    old_records = [_record(old, 0, purged_key, snapshot_record(p, purged_id, {"rev": "9"}), 9)]
    new_records = [_record(new, 0, purged_key, None, 5)]
    old_r, new_r = (DefaultPartitioner()(reused_key, [0, 1], [0, 1]),
                    DefaultPartitioner()(reused_key, [0, 1, 2], [0, 1, 2]))
    old_records.append(_record(old_r, 1, reused_key,
                               snapshot_record(p, reused_id, {"rev": "9", "seq": "1"}), 9))
    new_records += [_record(new_r, 1, reused_key, None, 5),
                    _record(new_r, 2, reused_key,
                            snapshot_record(p, reused_id, {"rev": "1", "seq": "2"}), 6)]
    read = SnapshotsRead()
    for record in (new_records + old_records if reverse else old_records + new_records):
        read.take(record)
    latest = read.latest(3)
    assert latest[purged_key] is None
    reused = latest[reused_key]
    assert reused is not None and reused.seq == 2
    # Never tombstoned: one batch, whose highest rev is its latest, even on the partition it
    # left (a producer still sending there until its metadata learns of the raise).
    read = SnapshotsRead()
    read.take(_record(new, 0, purged_key, snapshot_record(p, purged_id, {"rev": "1"}), 5))
    read.take(_record(old, 0, purged_key, snapshot_record(p, purged_id, {"rev": "7"}), 6))
    kept = read.latest(3)[purged_key]
    assert kept is not None and kept.rev == 7
    # A key on none of the partitions it goes to now (partitions added twice): its newest
    # record by the producers' timestamps.
    count = next(n for n in range(3, 100) if current_partition(purged_key, n) > 1)
    for tombstone_ts, snapshot_ts, restored in ((10, 9, False), (9, 10, True)):
        read = SnapshotsRead()
        read.take(_record(0, 0, purged_key, snapshot_record(p, purged_id, {"rev": "9"}),
                          snapshot_ts))
        read.take(_record(1, 0, purged_key, None, tombstone_ts))
        assert (read.latest(count)[purged_key] is not None) is restored


async def test_a_forced_rebuild_over_older_data_leaves_a_purged_batch_purged(
        topics: Settings, redis: Redis, store: BatchStore) -> None:
    """`rebuild --force` over older data (a backup from before a batch was deleted and purged,
    or removed by the retention): the rebuild read the batch's tombstone, and left the older
    copy where it was: GET answered the removed batch again, and the list showed it."""
    p = unique("test-force-purged")
    await store.create(p, "gone", spec())
    await store.create(p, "kept", spec())
    kept = dict(await raw(redis, "kept", p))
    producer = await open_producer(topics)
    try:
        await producer.send_and_wait(topics.topic_snapshots, snapshot_record(
            p, "gone", dict(await raw(redis, "gone", p))), key=snapshot_key(p, "gone"))
        await producer.send_and_wait(topics.topic_snapshots, None, key=snapshot_key(p, "gone"))
        await producer.send_and_wait(topics.topic_snapshots, snapshot_record(p, "kept", kept),
                                     key=snapshot_key(p, "kept"))
    finally:
        await producer.stop()
    await rebuild(topics, force=True)
    assert await store.get(p, "gone") is None
    assert list((await store.page(p, 10, None)).items) == ["kept"]


async def test_a_batch_removed_by_the_retention_stays_removed_once_its_tombstone_is_compacted(
        topics: Settings, redis: Redis, store: BatchStore) -> None:
    """A retention shorter than the commands topic's (a week): the batch is purged and
    tombstoned, compaction then removes its snapshots and, a day on (delete.retention.ms), its
    tombstone, while its run command is still on the commands topic. The rebuild took that
    command for one not taken yet and restored the batch from it: a batch removed days ago was
    back, pending, its run never to come (the commands group is past it). A run command the
    group committed was taken, and its batch snapshotted then: no record left means purged."""
    topics = topics.model_copy(update={"batch_retention_days": 1})
    p = unique("test-compacted")
    await send(topics, topics.topic_pipelines, pipeline_key(p, "1").decode(),
               pipeline_record(p, spec(version="1"), 0))
    now = time.time()
    # Taken two days ago; taken a minute ago (the batch gone when its run was taken: not one
    # the retention removed, restored as before); not taken yet.
    runs = {"b-removed": (now - 2 * 86400, True), "b-recent": (now - 60, True),
            "b-waiting": (now - 2 * 86400, False)}
    for seq, (batch_id, (ts, _)) in enumerate(runs.items(), start=1):
        run = Command("run", batch_id, p, pipeline_version="1", ts=ts,
                      recorded=Recorded(seq=seq, created_at="2026-12-01T00:00:00.000Z"))
        await send(topics, topics.topic_commands, batch_id, run.encode())
    records = {r.key: r async for r in read_whole(topics, topics.topic_commands)}
    ends: dict[TopicPartition, int] = {}
    for batch_id, (_, taken) in runs.items():
        record = records[batch_id.encode()]
        tp = TopicPartition(topics.topic_commands, record.partition)
        if taken:
            ends[tp] = max(ends.get(tp, 0), record.offset + 1)
        else:
            ends[tp] = min(ends.get(tp, record.offset), record.offset)
    # The commands group committed past the taken ones, not the other (two partitions: the
    # ids' keys decide where each went; where one partition holds both kinds, the test
    # cannot tell them apart).
    assert all(records[b.encode()].offset < ends[TopicPartition(
        topics.topic_commands, records[b.encode()].partition)] for b, (_, t) in runs.items() if t)
    assert all(records[b.encode()].offset >= ends[TopicPartition(
        topics.topic_commands, records[b.encode()].partition)] for b, (_, t) in runs.items()
        if not t)
    group = AIOKafkaConsumer(bootstrap_servers=topics.kafka_bootstrap,
                             group_id=topics.group_commands, enable_auto_commit=False)
    await group.start()
    try:
        group.assign(list(ends))
        await group.commit(ends)
    finally:
        await group.stop()
    await rebuild(topics)
    assert await store.get(p, "b-removed") is None, "a batch removed by the retention came back"
    for batch_id in ("b-recent", "b-waiting"):
        batch = await store.get(p, batch_id)
        assert batch is not None and batch["state"]["state"] == "pending"


async def test_a_forced_rebuild_is_refused_while_the_consumers_run(
        topics: Settings, redis: Redis, store: BatchStore) -> None:
    """`--force` is for a database that holds data, and it skipped the live consumers' check
    too: the events consumer applies an event, then snapshots, then commits, so a rebuild
    reading the snapshots between its apply and its snapshot wrote the older hash back over
    the newer one, its event committed: GET said running, for good, of a stopped batch."""
    p = unique("test-force-live")
    await store.create(p, "b", spec())
    older = {k: v for k, v in (await raw(redis, "b", p)).items() if k not in NOT_SNAPSHOTTED}
    await send(topics, topics.topic_snapshots, snapshot_key(p, "b").decode(),
               snapshot_record(p, "b", older))
    await store.apply([ev("b", "batch.state", p, state="stop", outcome="failed")])
    await redis.set(keys.HEARTBEAT_CONSUMERS, "{}", ex=60)  # the consumers are running
    with pytest.raises(NotEmpty):
        await rebuild(topics, force=True)
    batch = await store.get(p, "b")
    assert batch is not None and batch["outcome"] == "failed"


async def test_batches_made_after_the_sequence_went_back_are_listed_after_the_older_ones(
        store: BatchStore, redis: Redis, scripts: Scripts) -> None:
    """Redis restarted from an AOF that lost its last second: the batches created in it (L1,
    L2) are gone, with the sequence counter's last two steps, and the next ones (N1, N2, N3)
    took those sequences again. `rebuild --force` brings L1 and L2 back from their snapshots:
    two batches of each of those sequences. A page ending on one of them continued strictly
    below its sequence, so the other was never listed, and the list put L2 between N2 and
    N3."""
    p = unique("test-seq-back")
    for batch_id in ("old", "L1", "L2"):
        await store.create(p, batch_id, spec())
    lost = [Snapshot(p, b, dict(await raw(redis, b, p))) for b in ("old", "L1", "L2")]
    await redis.delete(*(keys.batch(p, b) for b in ("L1", "L2")))
    await redis.zrem(keys.batch_index(p), "L1", "L2")
    await redis.set(keys.batch_seq(p), 1)  # the AOF's counter, before its last second
    for batch_id in ("N1", "N2", "N3"):
        await store.create(p, batch_id, spec())
    made = [Snapshot(p, b, dict(await raw(redis, b, p))) for b in ("N1", "N2", "N3")]
    for n, snap in enumerate([*lost, *made]):  # each a millisecond after the one before
        snap.fields["created_at"] = snap.fields["updated_at"] = f"2026-12-01T00:00:00.00{n}Z"
    assert [s.seq for s in made] == [2, 3, 4] and [s.seq for s in lost] == [1, 2, 3]
    snapshots = [*lost, *made]
    snapshots += from_run_commands({}, [], snapshots, set())
    await restore_batches(redis, store, Pager(redis, scripts, b"secret"), snapshots, set(),
                          Restored())
    listed: list[str] = []
    token: str | None = None
    for _ in range(10):
        page = await store.page(p, 1, token)
        listed += list(page.items)
        token = page.token
        if not token:
            break
    assert listed == ["N3", "N2", "N1", "L2", "L1", "old"]
    latest = await store.latest(p)
    assert latest is not None and latest["id"] == "N3"


async def test_a_post_taken_during_a_rebuild_is_the_newest_batch(
        topics: Settings, redis: Redis, store: BatchStore,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An API left running during a rebuild (or started before it ended) takes a POST once
    the pipeline is registered again: its create took the sequence counter as the rebuild
    had not raised it yet (1), below the restored batches'. GET's latest answered an older
    batch, the list put the new one last, and a page ending on the restored batch of its
    sequence never listed it."""
    p = unique("test-post-during")
    await send(topics, topics.topic_pipelines, pipeline_key(p, "1").decode(),
               pipeline_record(p, spec(version="1"), 0))
    await store.create(p, "restored", spec(version="1"))
    fields = {**await raw(redis, "restored", p), "seq": "5"}  # four before it purged
    await redis.flushdb()
    await send(topics, topics.topic_snapshots, snapshot_key(p, "restored").decode(),
               snapshot_record(p, "restored", fields))
    real = restore_batches

    async def with_a_post(*args: Any, **kwargs: Any) -> None:
        await store.create(p, "posted", spec(version="1"))  # the API's POST, meanwhile
        await real(*args, **kwargs)

    monkeypatch.setattr("consumers.rebuild.restore_batches", with_a_post)
    await rebuild(topics)
    latest = await store.latest(p)
    assert latest is not None and latest["id"] == "posted"
    assert list((await store.page(p, 10, None)).items) == ["posted", "restored"]


async def _commit_past(settings: Settings, key: bytes) -> None:
    """The commands group committed past the record of `key` (it took it)."""
    record = next(r for r in [r async for r in read_whole(settings, settings.topic_commands)]
                  if r.key == key)
    tp = TopicPartition(settings.topic_commands, record.partition)
    group = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                             group_id=settings.group_commands, enable_auto_commit=False)
    await group.start()
    try:
        group.assign([tp])
        await group.commit({tp: record.offset + 1})
    finally:
        await group.stop()


async def test_a_published_id_removed_by_the_retention_stays_claimed_once_its_tombstone_is_gone(
        topics: Settings, redis: Redis) -> None:
    """A published batch removed by the retention keeps its id's claim in Redis (a publisher's
    retry of that id then makes nothing). The rebuild claimed again only the ids whose
    tombstone it read or whose delete is on the commands topic: once compaction dropped the
    tombstone (a day on) while the create command stayed (a week), the claim was not
    restored, and a retry of the publish ran the removed batch again. A create the commands
    group took made its batch, snapshotted then: no record of it left means removed."""
    topics = topics.model_copy(update={"batch_retention_days": 1})
    p = unique("test-pub-gone")
    batch_id = unique("batch-pub")
    await send(topics, topics.topic_commands, batch_id,
               published_command("run", p, batch_id, create={}, ts=time.time() - 2 * 86400))
    # One taken a minute ago, whose batch was never made (refused: its pipeline unknown then):
    # its retry, once the pipeline is there, runs.
    refused_id = unique("batch-pub")
    await send(topics, topics.topic_commands, refused_id,
               published_command("run", p, refused_id, create={}))
    await _commit_past(topics, batch_id.encode())
    await _commit_past(topics, refused_id.encode())
    await rebuild(topics)
    claim = await redis.get(keys.published(batch_id))
    assert claim is not None and orjson.loads(claim)["deleted"] is True
    assert await redis.get(keys.published(refused_id)) is None


async def test_a_version_put_after_a_loss_stays_the_latest(
        topics: Settings, redis: Redis) -> None:
    """Redis lost, the pipeline PUT again before the rebuild (its POSTs answered 404 till
    then): the API gave each record its place in the registry it saw, empty, so the topic
    holds two versions at place 0. The rebuild sorted them by that place alone, and over the
    live registry (`--force`) appended the versions it lacked after the ones there: GET's
    latest (and a POST's version) went back to an older version than the API last named."""
    registry = PipelineRegistry(redis, Scripts(redis))
    p, q = unique("test-put-after"), unique("test-put-after")
    records = [(p, "1", 0), (p, "2", 1), (p, "2", 0),  # p: its latest PUT again
               (q, "1", 0), (q, "2", 1), (q, "3", 0)]  # q: a new version PUT
    for pipeline_id, version, order in records:
        await send(topics, topics.topic_pipelines, pipeline_key(pipeline_id, version).decode(),
                   pipeline_record(pipeline_id, spec(version=version), order))
    await rebuild(topics)
    assert (await registry.latest_version(p), await registry.latest_version(q)) == ("2", "3")
    # Over the live registry, which holds what was PUT after the loss.
    await redis.flushdb()
    await registry.register(p, spec(version="2"))
    await registry.register(q, spec(version="3"))
    await rebuild(topics, force=True)
    assert [s.version for s in await registry.versions(p)] == ["1", "2"]
    assert [s.version for s in await registry.versions(q)] == ["1", "2", "3"]


def test_the_registration_order_is_each_records_own_unless_two_share_a_place() -> None:
    def v(version: str, order: int) -> PipelineVersion:
        return PipelineVersion("p", order, spec(version=version))

    def placed(rows: list[tuple[PipelineVersion, tuple[int, int]]]) -> list[str]:
        return [x.spec.version for x in sorted(reordered(rows), key=lambda x: x.order)]

    # Version 1 PUT again (unchanged) after 2: its record is the last written, at its place.
    assert placed([(v("2", 1), (0, 1)), (v("1", 0), (0, 2))]) == ["1", "2"]
    # After a loss, 3 then 1 PUT again (the registry the API saw: [3], then [3, 1]).
    assert placed([(v("2", 1), (0, 1)), (v("3", 0), (0, 2)), (v("1", 1), (0, 3))]) == [
        "2", "3", "1"]
