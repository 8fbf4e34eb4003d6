"""Retention (issue 12): the finished buckets APPLY_EVENTS keeps (a list of ids per hour of
stop, and the index of those hours), and the sweeper that removes finished batches after
`DHUB_BATCH_RETENTION_DAYS` (to the hour) from Redis (every key and index entry, the caches
told) and from the snapshot topic (a tombstone), at O(expired) per round."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from consumers.plumbing.options import ConsumerOptions
from consumers.retention import SWEEP_BATCH, RetentionSweeper
from core import keys
from core.codec import Event
from core.layout import render
from core.list_filter import ListFilter
from core.list_scripts import EPOCH_LUA, HOURS_LUA
from core.models import new_batch_id
from core.packing import unpacked
from core.paging import Pager
from core.restore import Restored, restore_batches
from core.scripts import Scripts
from core.settings import Settings
from core.snapshots import Snapshot, snapshot_key
from core.store import BatchStore
from tests.conftest import PrivateRedis, eventually
from tests.helpers import read_topic, spec

P = "keep"
NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def iso(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


async def batch(store: BatchStore, *, stopped_at: datetime | None) -> str:
    """A running batch, stopped at `stopped_at` (APPLY_EVENTS's `now`) unless None."""
    b = new_batch_id()
    await store.create(P, b, spec())
    # Created before it ran, as a real one is (the sweeper skips a batch created after its
    # bucket's hour: a later batch of a reused id).
    created = (stopped_at or NOW) - timedelta(hours=2)
    await store.redis.hset(keys.batch(P, b), "created_at", iso(created))
    await store.apply([Event("batch.state", b, P, state="running"),
                       Event("step.state", b, P, step="extract", state="running"),
                       Event("step.offsets", b, P, step="extract", offsets={"p0": 5})],
                      now=iso((stopped_at or NOW) - timedelta(hours=1)))
    if stopped_at is not None:
        await store.apply([Event("batch.state", b, P, state="stop", outcome="completed")],
                          now=iso(stopped_at))
    return b


async def rendered(redis: Redis, b: str) -> dict[str, Any]:
    return render(unpacked(cast(dict[str, str], await redis.hgetall(keys.batch(P, b)))))


def every_key(b: str) -> list[str]:
    return [keys.batch(P, b), keys.batch_seen(P, b)]


async def buckets(redis: Redis) -> dict[str, list[str]]:
    """Each finished bucket of P by its hour (the finished index's members) -> its ids."""
    hours = cast(list[str], await redis.zrange(keys.batch_finished_index(P), 0, -1))
    return {hour: cast(list[str], await redis.lrange(keys.batch_finished_hour(P, hour), 0, -1))
            for hour in hours}


def hour(at: datetime) -> str:
    return at.strftime("%Y%m%d%H")


async def listed_in(redis: Redis, b: str) -> list[str]:
    """The indexes holding `b` (the finished buckets by their hour)."""
    indexes = [keys.batch_index(P), *keys.batch_filter_indexes(P)]
    out = [name for name in indexes if await redis.zscore(name, b) is not None]
    return out + [at for at, ids in (await buckets(redis)).items() if b in ids]


async def test_epoch_reads_utc_iso_times_as_python_does(redis: Redis) -> None:
    times = ["1970-01-01T00:00:00.000Z", "2000-02-29T23:59:59.999Z", "2024-03-01T00:00:00Z",
             "2026-12-02T14:08:13.123Z", "2100-03-01T01:02:03.000Z"]
    for at in times:
        got = await redis.eval(EPOCH_LUA + "return epoch(ARGV[1])", 0, at)
        assert got == int(datetime.fromisoformat(at).timestamp()), at
    assert await redis.eval(EPOCH_LUA + "return epoch(ARGV[1])", 0, "soon") == 0


async def test_finish_appends_to_the_bucket_keys_names_and_indexes_its_hour(
        redis: Redis) -> None:
    finished = keys.batch_finished_index(P)
    for at, b in (("2026-12-02T14:08:13.123Z", "b1"), ("2026-12-02T14:59:59.999Z", "b2"),
                  ("2024-02-29T23:00:00.000Z", "b3"), ("soon", "b4")):
        await redis.eval(HOURS_LUA + "return finish(KEYS[1], ARGV[1], ARGV[2])", 1, finished,
                         b, at)
    assert await redis.zrange(finished, 0, -1, withscores=True) == [
        ("2024022923", datetime(2024, 2, 29, 23, tzinfo=UTC).timestamp()),
        ("2026120214", datetime(2026, 12, 2, 14, tzinfo=UTC).timestamp())]
    assert await buckets(redis) == {"2024022923": ["b3"], "2026120214": ["b1", "b2"]}


async def test_a_batch_enters_its_stop_hours_bucket_once_and_stays_there(
        redis: Redis, scripts: Scripts) -> None:
    store = BatchStore(redis, scripts, token_secret=b"s")
    running = await batch(store, stopped_at=None)
    assert await buckets(redis) == {}
    b = await batch(store, stopped_at=NOW)
    # A duplicate or later stop changes its outcome at most, never its place.
    await store.apply([Event("batch.state", b, P, state="stop", outcome="failed",
                             ts=time.time() + 3600)],
                      now=iso(NOW + timedelta(days=3)))
    other = await batch(store, stopped_at=NOW + timedelta(minutes=59))
    assert await buckets(redis) == {hour(NOW): [b, other]}
    # Hide and purge leave the ids (the sweeper skips them): no O(n) LREM.
    assert await store.hide(P, b)
    await store.purge(P, other)
    assert await listed_in(redis, other) == [hour(NOW)]
    assert await listed_in(redis, running) == [keys.batch_index(P),
                                               keys.batch_state_index(P, "running")]


async def test_trim_bucket_drops_the_ids_read_unless_the_head_changed(
        redis: Redis, scripts: Scripts) -> None:
    bucket, finished = keys.batch_finished_hour(P, "2026120212"), keys.batch_finished_index(P)
    await redis.rpush(bucket, "a", "b", "c", "d")
    await redis.zadd(finished, {"2026120212": 1, "2026120213": 2})

    async def trim(read: int, last: str, at: str = "2026120212") -> Any:
        return await scripts.trim_bucket(keys=[keys.batch_finished_hour(P, at), finished],
                                         args=[at, read, last])

    assert await trim(2, "b") == 2
    assert await redis.lrange(bucket, 0, -1) == ["c", "d"]
    assert await trim(2, "b") == -1  # another sweeper trimmed what this one read: no-op
    assert await redis.lrange(bucket, 0, -1) == ["c", "d"]
    assert await trim(2, "d") == 0
    assert not await redis.exists(bucket)
    assert await redis.zrange(finished, 0, -1) == ["2026120213"]
    assert await trim(0, "", "2026120213") == 0  # an hour whose bucket is gone leaves too
    assert await redis.zcard(finished) == 0


@pytest.fixture
def retention(topics: Settings) -> Settings:
    return topics.model_copy(update={"batch_retention_days": 30})


async def sweeper(settings: Settings) -> RetentionSweeper:
    part = RetentionSweeper(settings, clock=NOW.timestamp)
    await part.start()
    return part


async def test_a_round_removes_only_batches_finished_before_the_retention(
        retention: Settings, redis: Redis, scripts: Scripts) -> None:
    store = BatchStore.from_settings(redis, retention, scripts)
    await redis.sadd(keys.PIPELINES, P)
    old = await batch(store, stopped_at=NOW - timedelta(days=31))
    hidden = await batch(store, stopped_at=NOW - timedelta(days=31))
    await store.hide(P, hidden)  # the delete's clean-up purges it: the sweeper skips it
    purged = await batch(store, stopped_at=NOW - timedelta(days=31))
    await store.purge(P, purged)
    recent = await batch(store, stopped_at=NOW - timedelta(days=29))
    running = await batch(store, stopped_at=None)
    created_long_ago = await batch(store, stopped_at=None)
    await redis.hset(keys.batch(P, created_long_ago), "created_at", iso(NOW - timedelta(days=90)))
    kept = {b: await rendered(redis, b) for b in (recent, running, created_long_ago, hidden)}
    part = await sweeper(retention)
    try:
        await part.snapshots.write_current([(P, b) for b in (old, recent, running)])
        feed = redis.pubsub()
        await feed.subscribe(keys.CHANGES_CHANNEL)
        assert await part.sweep_once() == 1
        message: dict[str, Any] | None = None
        ours = keys.batch(P, "")  # the channel is the server's: other tests' messages too
        async with asyncio.timeout(5):
            while message is None or message["type"] != "message" \
                    or not str(message["data"]).startswith(ours):
                message = await feed.get_message(timeout=1)
        assert message["data"] == keys.batch(P, old)  # the caches evict it, as after a purge
        await feed.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed since redis 8.2
        for key in every_key(old):
            assert not await redis.exists(key)
        assert await listed_in(redis, old) == []
        assert {b: await rendered(redis, b) for b in kept} == kept
        # The expired bucket is gone whole, its hour with it.
        assert await buckets(redis) == {hour(NOW - timedelta(days=29)): [recent]}
        assert await part.sweep_once() == 0  # nothing left to do: nothing done
    finally:
        await part.stop()
    key_old, key_recent = snapshot_key(P, old), snapshot_key(P, recent)

    def tombstoned(records: list[Any]) -> bool:
        return any(r.key == key_old and r.value is None for r in records)

    latest: dict[bytes, Snapshot | None] = {}
    for r in await read_topic(retention, retention.topic_snapshots, tombstoned):
        latest[r.key] = Snapshot.decode(r.value) if r.value is not None else None
    assert latest[key_old] is None
    assert latest[key_recent] is not None


async def test_retention_zero_keeps_every_batch(retention: Settings, redis: Redis,
                                                scripts: Scripts) -> None:
    forever = retention.model_copy(update={"batch_retention_days": 0})
    store = BatchStore.from_settings(redis, forever, scripts)
    await redis.sadd(keys.PIPELINES, P)
    old = await batch(store, stopped_at=NOW - timedelta(days=3650))
    part = await sweeper(forever)
    try:
        assert await part.sweep_once() == 0
    finally:
        await part.stop()
    assert await redis.exists(keys.batch(P, old))
    assert hour(NOW - timedelta(days=3650)) in await listed_in(redis, old)


async def test_a_bucket_expires_once_its_whole_hour_is_past_the_retention(
        retention: Settings, redis: Redis, scripts: Scripts) -> None:
    """The precision is an hour: a batch is kept the retention, and at most an hour more."""
    store = BatchStore.from_settings(redis, retention, scripts)
    await redis.sadd(keys.PIPELINES, P)
    cutoff = NOW - timedelta(days=30)  # NOW is 12:00
    expired = [await batch(store, stopped_at=cutoff - timedelta(minutes=m)) for m in (1, 61)]
    kept = [await batch(store, stopped_at=cutoff + timedelta(minutes=m)) for m in (0, 1)]
    part = await sweeper(retention)
    try:
        assert await part.sweep_once() == 2
        assert [await redis.exists(keys.batch(P, b)) for b in expired + kept] == [0, 0, 1, 1]
        # Half an hour on: the 12:00 bucket is past the retention only in part, so kept.
        part._clock = (NOW + timedelta(minutes=30)).timestamp
        assert await part.sweep_once() == 0
        part._clock = (NOW + timedelta(hours=1)).timestamp
        assert await part.sweep_once() == 2
    finally:
        await part.stop()


async def test_stopped_batches_from_before_the_buckets_are_bucketed_once(
        retention: Settings, redis: Redis, scripts: Scripts) -> None:
    """As after an upgrade (the older finished index, id -> stop time, and the other retired
    indexes still there), or a rebuild that did not bucket: the first round buckets the
    stopped batches by the hour of their `updated_at`, deletes the retired keys, then sweeps."""
    store = BatchStore.from_settings(redis, retention, scripts)
    await redis.sadd(keys.PIPELINES, P)
    old = await batch(store, stopped_at=NOW - timedelta(days=40))
    recent = await batch(store, stopped_at=NOW - timedelta(days=1))
    running = await batch(store, stopped_at=None)
    hidden = await batch(store, stopped_at=NOW - timedelta(days=40))
    await store.hide(P, hidden)
    for at in await buckets(redis):
        await redis.delete(keys.batch_finished_hour(P, at))
    await redis.delete(keys.batch_finished_index(P), keys.batch_finished_indexed(P))
    for key in keys.batch_retired_keys(P):
        await redis.zadd(key, {old: 1})
    part = await sweeper(retention)
    try:
        assert await part.sweep_once() == 1
        assert not await redis.exists(keys.batch(P, old))
        updated = cast(str, await redis.hget(keys.batch(P, recent), "updated_at"))
        assert await buckets(redis) == {hour(datetime.fromisoformat(updated)): [recent]}
        assert [key for key in keys.batch_retired_keys(P) if await redis.exists(key)] == []
        assert await redis.exists(keys.batch(P, running), keys.batch(P, hidden)) == 2
        # Bucketed once: a batch dropped from its bucket now stays out of every bucket.
        await redis.delete(keys.batch_finished_hour(P, hour(datetime.fromisoformat(updated))))
        assert await part.sweep_once() == 0
        assert await buckets(redis) == {hour(datetime.fromisoformat(updated)): []}
    finally:
        await part.stop()


async def test_a_round_costs_what_its_expired_batches_do_whatever_the_history(
        retention: Settings, private_redis: PrivateRedis) -> None:
    """On a redis-server of the test's own (its command counts are the sweeper's alone)."""
    own = retention.model_copy(update={"redis_url": private_redis.url})
    redis = Redis.from_url(own.redis_url, decode_responses=True)
    try:
        store = BatchStore.from_settings(redis, own)
        await redis.sadd(keys.PIPELINES, P)
        for n in range(20):  # 1,000 kept, in 20 buckets
            await asyncio.gather(*(batch(store, stopped_at=NOW - timedelta(days=1, hours=n))
                                   for _ in range(50)))
        old = [await batch(store, stopped_at=NOW - timedelta(days=60)) for _ in range(3)]
        part = await sweeper(own)
        try:
            await part.backfill(P)  # once per pipeline and process: not the round's cost
            # Load the purge's and the trim's scripts: not the round's cost.
            await redis.script_load(SWEEP_BATCH)
            await store.scripts.trim_bucket(
                keys=[keys.batch_finished_hour(P, "none"), keys.batch_finished_index(P)],
                args=["none", 0, ""])
            await redis.config_resetstat()
            assert await part.sweep_once() == 3
            stats = await redis.info("commandstats")
        finally:
            await part.stop()
        calls = {name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items()}
        calls.pop("config|resetstat", None)
        # One read of the pipelines, the marker, one range of the expired hours; per expired
        # bucket one read of its ids, one check of each id's batch, one trim (the commands
        # its script runs are counted too: LINDEX, LTRIM, LLEN, the hour's ZREM); a purge
        # per expired batch (a read of its hash, for the batch a resume goes on from; the
        # script's check that it is still as read and no resume came, each filter index's
        # ZREM, the batch index's, the DEL of its keys, its purge mark, the change message),
        # after a read of its resumes (none here: none goes on from its data) and of its
        # published claim (marked deleted if any). None grows with the 1,000 batches kept.
        per_purge = {"hgetall": 1, "evalsha": 1, "hmget": 1, "scard": 1, "del": 1, "set": 1,
                     "publish": 1, "get": 1, "smembers": 1,
                     "zrem": 1 + len(keys.batch_filter_indexes(P))}
        per_bucket = {"lrange": 1, "evalsha": 1, "lindex": 1, "ltrim": 1, "llen": 1, "zrem": 1}
        expected = {"smembers": 1, "exists": 1, "zrangebyscore": 1, "hmget": 3}
        for name in {*per_purge, *per_bucket}:
            expected[name] = (expected.get(name, 0) + 3 * per_purge.get(name, 0)
                              + per_bucket.get(name, 0))
        assert calls == expected
        assert all([not await redis.exists(keys.batch(P, b)) for b in old])
        assert sum(len(ids) for ids in (await buckets(redis)).values()) == 1_000
    finally:
        await redis.aclose()


async def test_the_part_sweeps_at_start_and_goes_on_while_rounds_hit_their_limit(
        retention: Settings, redis: Redis, scripts: Scripts) -> None:
    store = BatchStore.from_settings(redis, retention, scripts)
    await redis.sadd(keys.PIPELINES, P)
    old = [await batch(store, stopped_at=NOW - timedelta(days=45)) for _ in range(5)]
    recent = await batch(store, stopped_at=NOW)
    options = ConsumerOptions(retention_batch=2, retention_interval_s=3600)
    part = RetentionSweeper(retention, options, clock=NOW.timestamp)
    await part.start()
    task = asyncio.create_task(part.run())
    try:
        async def all_swept() -> bool:
            return not any([await redis.exists(keys.batch(P, b)) for b in old])
        await eventually(all_swept, timeout=10)  # not 3 rounds an hour apart
        # The count follows the last round's script reply: seen gone in Redis a moment before.
        await eventually(lambda: part.swept == 5, timeout=10)
        assert await redis.exists(keys.batch(P, recent))
    finally:
        await part.stop()
        await task


async def test_a_rebuild_writes_the_filter_indexes_and_the_finished_buckets(
        redis: Redis, scripts: Scripts) -> None:
    """`restore_batches` (the Redis half of `make rebuild`): hashes as snapshotted, then the
    filter indexes and the buckets from them, with their markers, so neither the first
    filtered page nor the sweeper has a backfill left to do."""
    store = BatchStore(redis, scripts, token_secret=b"s", changes_channel="")
    stopped = await batch(store, stopped_at=NOW - timedelta(days=2))
    running = await batch(store, stopped_at=None)
    hidden = await batch(store, stopped_at=NOW - timedelta(days=2))
    snapshots = [Snapshot(P, b, cast(dict[str, str], await redis.hgetall(keys.batch(P, b))))
                 for b in (stopped, running, hidden)]
    await redis.flushdb()
    await restore_batches(redis, store, Pager(redis, scripts, b"s"), snapshots, {(P, hidden)},
                          Restored(batches=0))
    updated = cast(str, await redis.hget(keys.batch(P, stopped), "updated_at"))
    assert await buckets(redis) == {hour(datetime.fromisoformat(updated)): [stopped]}
    assert await listed_in(redis, stopped) == [keys.batch_index(P),
                                               keys.batch_outcome_index(P, "completed"),
                                               hour(datetime.fromisoformat(updated))]
    assert await listed_in(redis, running) == [keys.batch_index(P),
                                               keys.batch_state_index(P, "running")]
    assert await listed_in(redis, hidden) == []
    assert await redis.get(keys.batch_finished_indexed(P)) == "1"
    assert await redis.get(keys.batch_indexes_built(P)) == "1"
    page = await store.page(P, 10, None, ListFilter(state="stop"))
    assert list(page.items) == [stopped]
