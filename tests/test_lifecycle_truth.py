"""A batch's end of life under races and odd-but-legal use: the retention sweeper against
deletes, resumes and its own limits, packed batches against late events (review R1)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from aiokafka import AIOKafkaProducer
from pydantic import ValidationError
from redis.asyncio import Redis

from consumers.export_state import export
from consumers.plumbing.creation import claim_ttl_s
from consumers.plumbing.options import ConsumerOptions
from consumers.plumbing.part import Clients, open_clients
from consumers.plumbing.snapshot_batch import SnapshotBatches
from consumers.rebuild_read import read_snapshots
from consumers.retention import RetentionSweeper
from core import keys
from core import snapshots as snapshots_module
from core.codec import Event
from core.models import new_batch_id
from core.scripts import Scripts
from core.settings import Settings
from core.snapshots import Snapshot, SnapshotWriter, snapshot_key
from core.store import BatchStore
from tests.conftest import eventually
from tests.helpers import AUTH, api_client, api_settings, read_topic, spec, swept_at
from tests.test_consumers_support import new_batch, unique
from tests.test_delete_cleans_data import delete_pass, mixed_spec, write_data
from tests.test_resume_truth import GO_ON, SPEC, failed_in, post
from tests.test_resume_truth import P as RP
from tests.test_retention import NOW, P, batch, iso


async def test_a_full_round_of_batches_deleted_meanwhile_is_followed_at_once(
        topics: Settings, redis: Redis, scripts: Scripts) -> None:
    """A round that hit its limit on ids of batches deleted since (their ids stay in their
    bucket) removed none, and the part then slept its interval: an expired batch behind them
    stayed an interval per limit's worth of such ids (an hour each, here)."""
    retention = topics.model_copy(update={"batch_retention_days": 30})
    store = BatchStore.from_settings(redis, retention, scripts)
    await redis.sadd(keys.PIPELINES, P)
    deleted = [await batch(store, stopped_at=NOW - timedelta(days=50)) for _ in range(4)]
    for b in deleted:
        await store.hide(P, b)
        await store.purge(P, b)
    expired = await batch(store, stopped_at=NOW - timedelta(days=40))
    options = ConsumerOptions(retention_batch=2, retention_interval_s=3600)
    part = RetentionSweeper(retention, options, clock=NOW.timestamp)
    await part.start()
    task = asyncio.create_task(part.run())
    try:
        async def swept() -> bool:
            return not await redis.exists(keys.batch(P, expired))
        await eventually(swept, timeout=10)
        assert part.swept == 1
    finally:
        await part.stop()
        await task


async def test_a_delete_landing_while_retention_removes_its_batch_still_removes_its_data(
        topics: Settings, redis: Redis, tmp_path: Path) -> None:
    """The sweeper checked the batch (stopped, not hidden), then a DELETE hid it (200) and
    queued its clean-up, then the sweeper purged it: the clean-up found no hash, so no step
    names whose data to remove, and the batch's files stayed on the worker for good."""
    retention = topics.model_copy(update={"batch_retention_days": 30})
    pipeline_id = unique("test-r1")
    spec = mixed_spec(pipeline_id)
    store = BatchStore.from_settings(redis, retention)
    batch_id = await new_batch(redis, retention, pipeline_id, spec)
    await redis.hset(keys.batch(pipeline_id, batch_id), "created_at",
                     iso(NOW - timedelta(days=41)))
    await store.apply([Event("batch.state", batch_id, pipeline_id, state="stop",
                             outcome="failed")], now=iso(NOW - timedelta(days=40)))
    data = write_data(tmp_path, pipeline_id, batch_id, spec)
    part = RetentionSweeper(retention, clock=NOW.timestamp)
    await part.start()
    real = part.snapshots.tombstone

    async def delete_meanwhile(p: str, b: str) -> None:
        await store.hide(p, b)  # the DELETE's own hide, after the sweeper's check
        await real(p, b)

    part.snapshots.tombstone = delete_meanwhile  # type: ignore[method-assign,assignment]
    try:
        await part.sweep_once()
    finally:
        await part.stop()
    assert await delete_pass(redis, retention, tmp_path, pipeline_id, batch_id) is None
    assert not data.exists(), "the deleted batch's data was left on the worker"
    assert not await redis.exists(keys.batch(pipeline_id, batch_id))


@pytest.mark.parametrize("value", ["inf", "1e12"])
def test_a_retention_no_claim_can_last_is_refused_at_start_naming_it(
        monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """`inf` (read as "forever") was taken: the commands consumer's claim lifetime
    (`claim_ttl_s`) raised OverflowError at every start, and 10**12 days made every published
    run's claim a Redis error, while the API answered POSTs whose batches stayed pending."""
    monkeypatch.setenv("DHUB_BATCH_RETENTION_DAYS", value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert "batch_retention_days" in str(info.value)


async def test_the_longest_retention_taken_gives_claims_redis_keeps(
        monkeypatch: pytest.MonkeyPatch, redis: Redis) -> None:
    monkeypatch.setenv("DHUB_BATCH_RETENTION_DAYS", "36500")
    days = Settings().batch_retention_days
    assert await redis.set(keys.published("batch-r1-claim"), "{}", nx=True,
                           ex=claim_ttl_s(days))


async def stopped_resume(api: Any, redis: Redis, tmp_path: Path, retention: Settings
                         ) -> tuple[str, str, datetime]:
    """A failed half way; B, its resume, stopped before any step ran (its data is still A's),
    29 days from now: A's id, B's, and that time."""
    assert (await api.put(f"/api/v1/pipelines/{RP}", json=SPEC, headers=AUTH)).status == 201
    a = await failed_in(api, redis, tmp_path, "transform")
    status, body = await post(api, f"/api/v1/batches/{RP}/{a}/resume", json=GO_ON)
    assert status == 200, body
    b = str(body["item"])
    later = datetime.now(UTC) + timedelta(days=29)
    await BatchStore.from_settings(redis, retention).apply(
        [Event("batch.state", b, RP, state="stop", outcome="cancelled")], now=iso(later))
    return a, b, later


async def test_retention_keeps_the_data_holder_of_a_kept_resume_that_never_ran_a_step(
        topics: Settings, redis: Redis, tmp_path: Path) -> None:
    """A failed; B, its resume, stopped before any step ran (its data is still A's). A's
    retention removed A: a resume of B then answered 409 "goes on from the data of batch A,
    deleted since: there is nothing to resume from", though A was never deleted and its
    files were all there (retention removes the record only)."""
    retention = topics.model_copy(update={"batch_retention_days": 30})
    async with api_client(api_settings(retention)) as api:
        a, b, later = await stopped_resume(api, redis, tmp_path, retention)
        assert await swept_at(retention, (later + timedelta(days=2)).timestamp) == 0
        assert (await api.get(f"/api/v1/batches/{RP}/{a}", headers=AUTH)).status == 200
        status, body = await post(api, f"/api/v1/batches/{RP}/{b}/resume")
        assert status == 200, body
        c = body["item"]  # goes on from A's data too
        await BatchStore.from_settings(redis, retention).apply(
            [Event("batch.state", c, RP, state="stop", outcome="cancelled")])
        # Once no kept batch goes on from its data, A goes: the retention of B and C removes
        # them, and the next look at A (a retention after it was kept) removes A.
        assert await swept_at(retention, (later + timedelta(days=62)).timestamp) == 3
        assert not await redis.exists(*(keys.batch(RP, x) for x in (a, b, c)))


class _ChangedDuringSend:
    """The export's producer: before its record of `batch_id` goes, the batch stops and the
    events consumer's snapshot of that (later) version reaches the topic first, as a poll's
    flush can between the export's read of the hash and its send."""

    def __init__(self, producer: AIOKafkaProducer, redis: Redis, topics: Settings,
                 pipeline_id: str, batch_id: str, purge: bool = False) -> None:
        self._producer, self._redis, self._topics = producer, redis, topics
        self._purge = purge
        self._key = snapshot_key(pipeline_id, batch_id)
        self._batch = (pipeline_id, batch_id)
        self.raced = False

    async def send_and_wait(self, *args: Any, **kwargs: Any) -> Any:
        return await self._producer.send_and_wait(*args, **kwargs)

    async def send(self, topic: str, value: bytes | None, key: bytes | None = None) -> Any:
        if key == self._key and not self.raced:
            self.raced = True
            pipeline_id, batch_id = self._batch
            store = BatchStore.from_settings(self._redis, self._topics)
            writer = SnapshotWriter(self._producer, self._redis, topic)
            if self._purge:  # a delete's clean-up (or retention): purge, then tombstone
                await store.purge(pipeline_id, batch_id)
                await writer.tombstone(pipeline_id, batch_id)
            else:
                await store.apply([Event("batch.state", batch_id, pipeline_id, state="stop",
                                         outcome="failed")])
                await writer.write_current([self._batch])
        return await self._producer.send(topic, value, key=key)


async def test_an_export_racing_a_batchs_change_leaves_the_newer_snapshot_last(
        topics: Settings, redis: Redis) -> None:
    """The export read a running batch, the batch stopped and the events consumer wrote that
    snapshot, then the export's older one landed after it: compaction keeps the last record
    of a key, so a rebuild brought the batch back running (the stop's event committed)."""
    pipeline_id = unique("test-r1x")
    batch_id = await new_batch(redis, topics, pipeline_id, spec(name=pipeline_id))
    store = BatchStore.from_settings(redis, topics)
    await store.apply([Event("batch.state", batch_id, pipeline_id, state="running")])
    async with contextlib.AsyncExitStack() as scope:
        clients = await open_clients(scope, topics)
        racing = _ChangedDuringSend(clients.producer, redis, topics, pipeline_id, batch_id)
        assert await export(Clients(redis, cast(AIOKafkaProducer, racing)), topics) == (1, 1)
    assert racing.raced
    key = snapshot_key(pipeline_id, batch_id)

    def last_is_current(records: list[Any]) -> bool:
        ours = [r for r in records if r.key == key]
        return len(ours) >= 2 and Snapshot.decode(ours[-1].value).fields["state"] == "stop"

    await read_topic(topics, topics.topic_snapshots, last_is_current, timeout=10)


async def test_an_export_racing_a_batchs_purge_leaves_its_tombstone_last(
        topics: Settings, redis: Redis) -> None:
    """The export read a batch, the batch was purged and tombstoned, then the export's
    snapshot landed after the tombstone: a rebuild brought a removed batch back."""
    pipeline_id = unique("test-r1p")
    batch_id = await new_batch(redis, topics, pipeline_id, spec(name=pipeline_id))
    async with contextlib.AsyncExitStack() as scope:
        clients = await open_clients(scope, topics)
        racing = _ChangedDuringSend(clients.producer, redis, topics, pipeline_id, batch_id,
                                    purge=True)
        await export(Clients(redis, cast(AIOKafkaProducer, racing)), topics)
    assert racing.raced
    key = snapshot_key(pipeline_id, batch_id)

    def last_is_tombstone(records: list[Any]) -> bool:  # after the export's snapshot
        values = [r.value for r in records if r.key == key]
        return any(v is not None for v in values) and values[-1] is None

    await read_topic(topics, topics.topic_snapshots, last_is_tombstone, timeout=10)


class _PurgedBeforeSend(SnapshotBatches):
    """The events consumer's flush whose records were read just before retention's tombstone
    and purge of one of them, and sent after both."""

    purged: tuple[str, str] | None = None

    async def _send(self, batches: Sequence[tuple[str, str]],
                    records: list[str | None]) -> int:
        if self.purged is not None:
            writer = SnapshotWriter(self.producer, self.redis, self.topic)
            await writer.tombstone(*self.purged)
            await BatchStore.from_settings(self.redis, Settings()).purge(*self.purged)
        return await super()._send(batches, records)


async def test_a_flush_racing_a_purge_leaves_the_tombstone_last(
        topics: Settings, redis: Redis) -> None:
    """A late event reached a batch retention was removing: the flush read the batch before
    the purge and sent its snapshot after the tombstone, so compaction kept the snapshot and
    a rebuild brought the removed batch back (for a retention more: bucketed by the late
    event's `updated_at`)."""
    pipeline_id = unique("test-r1f")
    batch_id, kept_id = [await new_batch(redis, topics, pipeline_id, spec(name=pipeline_id))
                         for _ in range(2)]
    async with contextlib.AsyncExitStack() as scope:
        clients = await open_clients(scope, topics)
        flush = _PurgedBeforeSend(clients.producer, redis, topics.topic_snapshots)
        flush.purged = (pipeline_id, batch_id)
        await flush.write_current([(pipeline_id, batch_id), (pipeline_id, kept_id)])
    key = snapshot_key(pipeline_id, batch_id)

    def settled(records: list[Any]) -> bool:
        return len([r for r in records if r.key == key]) >= 2 and any(
            r.key == snapshot_key(pipeline_id, kept_id) for r in records)

    records = await read_topic(topics, topics.topic_snapshots, settled, timeout=10)
    last = [r for r in records if r.key == key][-1]
    assert last.value is None, "the purged batch's snapshot landed after its tombstone"
    assert [s.batch_id for s in await read_snapshots(topics)
            if s.pipeline_id == pipeline_id] == [kept_id]


@pytest.mark.parametrize(("variable", "value"), [
    # ZRANGEBYSCORE ... LIMIT 0 0: no expired hour was ever read, and no finished batch
    # removed, while the retention said 30 days.
    ("DHUB_RETENTION_BATCH", "0"),
    # LIMIT 0 -1 reads every hour, LRANGE 0 -2 all of a bucket but its last id, which stayed.
    ("DHUB_RETENTION_BATCH", "-1"),
    # A round at every turn of the loop: a core spent on rounds with nothing to do.
    ("DHUB_RETENTION_INTERVAL_S", "0"),
])
def test_a_retention_option_that_removes_nothing_or_spins_is_refused_naming_it(
        monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as info:
        ConsumerOptions()
    assert variable.removeprefix("DHUB_").lower() in str(info.value)



Meanwhile = Callable[[str, str], Awaitable[None]]


@dataclass
class _Expired:
    """A batch stopped 40 days ago under a 30-day retention, and its sweeper."""

    retention: Settings
    store: BatchStore
    batch_id: str
    part: RetentionSweeper

    async def swept(self, meanwhile: Meanwhile) -> int:
        """One round, `meanwhile` run after each tombstone of the sweeper's (the first comes
        between its check of the batch and its purge)."""
        real = self.part.snapshots.tombstone

        async def tombstone(p: str, b: str) -> None:
            await real(p, b)
            await meanwhile(p, b)

        self.part.snapshots.tombstone = tombstone  # type: ignore[method-assign,assignment]
        return await self.part.sweep_once()


@contextlib.asynccontextmanager
async def _expired(topics: Settings, redis: Redis, scripts: Scripts) -> AsyncIterator[_Expired]:
    retention = topics.model_copy(update={"batch_retention_days": 30})
    store = BatchStore.from_settings(redis, retention, scripts)
    await redis.sadd(keys.PIPELINES, P)
    batch_id = await batch(store, stopped_at=NOW - timedelta(days=40))
    part = RetentionSweeper(retention, clock=NOW.timestamp)
    await part.start()
    try:
        yield _Expired(retention, store, batch_id, part)
    finally:
        await part.stop()


async def test_a_resume_noted_while_retention_removes_its_holder_keeps_the_holder(
        topics: Settings, redis: Redis, scripts: Scripts) -> None:
    """The sweeper found no resume of A, then a resume of A noted itself and saw A visible
    (its create goes on), then the sweeper purged A: the resume went on from a batch whose
    record was gone (its own resume refused as having nothing to go on from)."""
    resume = new_batch_id()
    async with _expired(topics, redis, scripts) as expired:
        retention, store, a = expired.retention, expired.store, expired.batch_id

        async def resumed_meanwhile(p: str, b: str) -> None:
            await store.note_resume(p, b, resume)
            assert await store.resume_may_go_on(p, b, resume)

        assert await expired.swept(resumed_meanwhile) == 0
    assert await store.get(P, a) is not None, "the holder of a resume going on was removed"
    key = snapshot_key(P, a)

    def snapshot_last(records: list[Any]) -> bool:
        ours = [r for r in records if r.key == key]
        return len(ours) >= 2 and ours[-2].value is None and ours[-1].value is not None

    # Its tombstone had gone first: its snapshot is written again after it.
    await read_topic(retention, retention.topic_snapshots, snapshot_last, timeout=10)
    # Kept, it is looked at again a retention later (its resume gone by then).
    await redis.srem(keys.resumed_by(P, a), resume)
    assert await swept_at(retention, (NOW + timedelta(days=31)).timestamp) == 1


async def test_a_later_batch_of_the_id_created_during_the_sweep_is_left_with_its_snapshot(
        topics: Settings, redis: Redis, scripts: Scripts) -> None:
    """The id's batch was removed and a later batch of the id (a published id whose claim
    had expired) created between the sweeper's check and its purge: the purge removed the
    new batch, whose snapshot the tombstone had already replaced."""
    async with _expired(topics, redis, scripts) as expired:
        retention, store, a = expired.retention, expired.store, expired.batch_id

        async def created_again(p: str, b: str) -> None:
            await store.purge(p, b)  # as another sweeper's, or a delete's
            await store.create(p, b, spec())

        assert await expired.swept(created_again) == 0
    later = await store.get(P, a)
    assert later is not None and later["state"]["state"] == "pending"
    key = snapshot_key(P, a)

    def snapshot_last(records: list[Any]) -> bool:
        ours = [r for r in records if r.key == key]
        return bool(ours) and ours[-1].value is not None and \
            Snapshot.decode(ours[-1].value).fields["state"] == "pending"

    await read_topic(retention, retention.topic_snapshots, snapshot_last, timeout=10)


async def test_a_late_snapshot_between_retentions_tombstone_and_purge_is_not_left_last(
        topics: Settings, redis: Redis, scripts: Scripts) -> None:
    """Retention tombstones a batch, then purges it. A late event's flush that read the batch
    between the two (its hash still there, so its own look after the send found nothing
    gone) landed its snapshot after the tombstone: compaction kept the snapshot, and a
    rebuild brought the removed batch back (diff review)."""
    flushed: list[str] = []
    async with _expired(topics, redis, scripts) as expired:
        retention, a = expired.retention, expired.batch_id

        async def late_flush_meanwhile(p: str, b: str) -> None:
            if flushed:  # the sweeper's second tombstone, after its purge
                return
            flushed.append(b)
            async with contextlib.AsyncExitStack() as scope:
                clients = await open_clients(scope, retention)
                flush = SnapshotBatches(clients.producer, redis, retention.topic_snapshots)
                assert await flush.write_current([(p, b)]) == 1

        assert await expired.swept(late_flush_meanwhile) == 1
    key = snapshot_key(P, a)

    def settled(records: list[Any]) -> bool:
        return len([r for r in records if r.key == key]) >= 3

    records = await read_topic(retention, retention.topic_snapshots, settled, timeout=10)
    assert [r for r in records if r.key == key][-1].value is None
    assert a not in {s.batch_id for s in await read_snapshots(retention)}


async def test_a_flush_retried_after_its_look_failed_still_tombstones_the_purged_batch(
        topics: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flush's look for batches purged under it failed (a Redis blip) after its records
    were sent; its retry read the purged batch as gone, sent nothing for it, and so looked
    only at the others: the snapshot sent after the purge's tombstone stayed last (diff
    review)."""
    pipeline_id = unique("test-r1g")
    batch_id = await new_batch(redis, topics, pipeline_id, spec(name=pipeline_id))
    async with contextlib.AsyncExitStack() as scope:
        clients = await open_clients(scope, topics)
        flush = _PurgedBeforeSend(clients.producer, redis, topics.topic_snapshots)
        flush.purged = (pipeline_id, batch_id)
        real = snapshots_module.run_all  # type: ignore[attr-defined]

        async def blip(redis: Redis, script: Any, calls: list[list[Any]]) -> list[Any]:
            if script is flush._writer._purged:
                raise ConnectionError("redis blip")
            return await real(redis, script, calls)

        monkeypatch.setattr(snapshots_module, "run_all", blip)
        with pytest.raises(ConnectionError):
            await flush.write_current([(pipeline_id, batch_id)])
        monkeypatch.setattr(snapshots_module, "run_all", real)
        flush.purged = None
        await flush.write_current([(pipeline_id, batch_id)])  # the caller's retry
    key = snapshot_key(pipeline_id, batch_id)

    def settled(records: list[Any]) -> bool:
        return len([r for r in records if r.key == key]) >= 3

    records = await read_topic(topics, topics.topic_snapshots, settled, timeout=10)
    assert [r for r in records if r.key == key][-1].value is None


async def test_a_resume_noted_while_another_leaves_the_set_keeps_the_holder(
        topics: Settings, redis: Redis, scripts: Scripts) -> None:
    """The purge checked only how many resumes the holder's set held: a resume noting itself
    while another left the set (its purge by another sweeper, or a DELETE's clean-up) kept
    the count, and the holder was removed under the new resume (diff review)."""
    resume = new_batch_id()
    async with _expired(topics, redis, scripts) as expired:
        store, a = expired.store, expired.batch_id
        await redis.sadd(keys.resumed_by(P, a), "resume-long-gone")  # no batch, not recent

        async def swapped_meanwhile(p: str, b: str) -> None:
            if await redis.srem(keys.resumed_by(p, b), "resume-long-gone"):
                await store.note_resume(p, b, resume)
                assert await store.resume_may_go_on(p, b, resume)

        assert await expired.swept(swapped_meanwhile) == 0
    assert await store.get(P, a) is not None, "the holder of a resume going on was removed"


async def test_a_snapshot_written_as_its_batch_is_purged_is_followed_by_its_tombstone(
        topics: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """SnapshotWriter.write_current (a kept batch's snapshot written again by retention, the
    commands consumer's creation snapshot) read a batch that a DELETE's clean-up then purged
    and tombstoned before the record was sent: the snapshot landed last, and a rebuild
    brought the deleted batch back (diff review)."""
    pipeline_id = unique("test-r1h")
    batch_id = await new_batch(redis, topics, pipeline_id, spec(name=pipeline_id))
    async with contextlib.AsyncExitStack() as scope:
        clients = await open_clients(scope, topics)
        writer = SnapshotWriter(clients.producer, redis, topics.topic_snapshots)
        real_fit = writer._fit
        purged: list[str] = []

        def purged_meanwhile(p: str, b: str, fields: Any) -> bytes | None:
            purged.append(b)
            return real_fit(p, b, fields)

        monkeypatch.setattr(writer, "_fit", purged_meanwhile)
        real_send = clients.producer.send

        async def send_after_purge(topic: str, value: Any = None, key: Any = None,
                                   *args: Any, **kwargs: Any) -> Any:
            if purged and value is not None:
                purged.clear()  # the DELETE's clean-up: purge, then tombstone
                await BatchStore.from_settings(redis, topics).purge(pipeline_id, batch_id)
                await clients.producer.send_and_wait(topic, None, key=key)
            return await real_send(topic, value, key, *args, **kwargs)

        monkeypatch.setattr(clients.producer, "send", send_after_purge)
        assert await writer.write_current([(pipeline_id, batch_id)]) == 1
    key = snapshot_key(pipeline_id, batch_id)

    def settled(records: list[Any]) -> bool:
        return len([r for r in records if r.key == key]) >= 3

    records = await read_topic(topics, topics.topic_snapshots, settled, timeout=10)
    assert [r for r in records if r.key == key][-1].value is None


@pytest.mark.parametrize("writer_kind", ["flush", "writer"])
async def test_a_hash_lost_without_a_purge_keeps_its_snapshot_for_the_rebuild(
        topics: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch,
        writer_kind: str) -> None:
    """A snapshot's writer tombstones again a batch gone once its record is sent, for a purge
    that raced it. A hash gone without a purge is Redis losing its data (a restart without
    persistence, a FLUSHALL): the very case a rebuild from the topic is for. Tombstoned, the
    batch's last snapshot went, and the rebuild could not restore an accepted batch."""
    pipeline_id = unique("test-r1l")
    batch_id = await new_batch(redis, topics, pipeline_id, spec(name=pipeline_id))
    async with contextlib.AsyncExitStack() as scope:
        clients = await open_clients(scope, topics)
        real_send = clients.producer.send
        lost: list[bool] = []

        async def lost_after_send(topic: str, value: Any = None, key: Any = None,
                                  *args: Any, **kwargs: Any) -> Any:
            sent = await real_send(topic, value, key, *args, **kwargs)
            if value is not None and not lost:
                lost.append(True)
                await redis.delete(keys.batch(pipeline_id, batch_id))  # Redis lost it
            return sent

        monkeypatch.setattr(clients.producer, "send", lost_after_send)
        if writer_kind == "flush":
            flush = SnapshotBatches(clients.producer, redis, topics.topic_snapshots)
            monkeypatch.setattr(flush.producer, "send_batch", _sending_batch(lost, redis,
                                keys.batch(pipeline_id, batch_id), flush.producer))
            await flush.write_current([(pipeline_id, batch_id)])
        else:
            writer = SnapshotWriter(clients.producer, redis, topics.topic_snapshots)
            assert await writer.write_current([(pipeline_id, batch_id)]) == 1
        assert lost
        # A marker after the writer's records: the topic holds everything written before it.
        await clients.producer.send_and_wait(topics.topic_snapshots, b"{}", key=b"marker")
    key = snapshot_key(pipeline_id, batch_id)

    def settled(records: list[Any]) -> bool:
        return any(r.key == b"marker" for r in records)

    records = await read_topic(topics, topics.topic_snapshots, settled, timeout=10)
    ours = [r.value for r in records if r.key == key]
    assert ours and ours[-1] is not None, "the lost batch's snapshot was tombstoned"


def _sending_batch(lost: list[bool], redis: Redis, hash_key: str,
                   producer: AIOKafkaProducer) -> Any:
    """The flush's `send_batch`, with the hash lost once the batch is handed over."""
    real = producer.send_batch

    async def send_batch(*args: Any, **kwargs: Any) -> Any:
        future = await real(*args, **kwargs)
        if not lost:
            lost.append(True)
            await redis.delete(hash_key)
        return future

    return send_batch
