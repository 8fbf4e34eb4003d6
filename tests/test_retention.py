"""Retention (issue 12): the finished index APPLY_EVENTS keeps, and the sweeper that removes
finished batches after `DHUB_BATCH_RETENTION_DAYS` from Redis (every key and index entry,
the caches told) and from the snapshot topic (a tombstone), at O(expired) per round."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from consumers.plumbing.options import ConsumerOptions
from consumers.retention import RetentionSweeper
from core import keys
from core.codec import Event
from core.layout import render
from core.list_scripts import EPOCH_LUA
from core.models import new_batch_id
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
    await store.apply([Event("batch.state", b, P, state="running"),
                       Event("step.state", b, P, step="extract", state="running"),
                       Event("step.offsets", b, P, step="extract", offsets={"p0": 5})],
                      now=iso((stopped_at or NOW) - timedelta(hours=1)))
    if stopped_at is not None:
        await store.apply([Event("batch.state", b, P, state="stop", outcome="completed")],
                          now=iso(stopped_at))
    return b


async def rendered(redis: Redis, b: str) -> dict[str, Any]:
    return render(cast(dict[str, str], await redis.hgetall(keys.batch(P, b))))


def every_key(b: str) -> list[str]:
    return [keys.batch(P, b), keys.batch_seen(P, b)]


async def listed_in(redis: Redis, b: str) -> list[str]:
    """The indexes holding `b` (the created index by its sequence)."""
    indexes = [keys.batch_index(P), *keys.batch_filter_indexes(P), keys.batch_finished_index(P)]
    out = [name for name in indexes if await redis.zscore(name, b) is not None]
    members = cast(list[str], await redis.zrange(keys.batch_created_index(P), 0, -1))
    seq = await redis.zscore(keys.batch_index(P), b)
    if seq is not None and any(m.endswith(f"|{int(seq):016d}") for m in members):
        out.append(keys.batch_created_index(P))
    return out


async def test_epoch_reads_utc_iso_times_as_python_does(redis: Redis) -> None:
    times = ["1970-01-01T00:00:00.000Z", "2000-02-29T23:59:59.999Z", "2024-03-01T00:00:00Z",
             "2026-12-02T14:08:13.123Z", "2100-03-01T01:02:03.000Z"]
    for at in times:
        got = await redis.eval(EPOCH_LUA + "return epoch(ARGV[1])", 0, at)
        assert got == int(datetime.fromisoformat(at).timestamp()), at
    assert await redis.eval(EPOCH_LUA + "return epoch(ARGV[1])", 0, "soon") == 0


async def test_a_batch_enters_the_finished_index_at_its_stop_and_leaves_it_when_hidden(
        redis: Redis, scripts: Scripts) -> None:
    store = BatchStore(redis, scripts, token_secret=b"s")
    finished = keys.batch_finished_index(P)
    running = await batch(store, stopped_at=None)
    assert await redis.zscore(finished, running) is None
    b = await batch(store, stopped_at=NOW)
    assert await redis.zscore(finished, b) == NOW.timestamp()
    # A duplicate or later stop changes its outcome at most, never its place.
    await store.apply([Event("batch.state", b, P, state="stop", outcome="failed", ts=9e9)],
                      now=iso(NOW + timedelta(days=3)))
    assert await redis.zscore(finished, b) == NOW.timestamp()
    assert await store.hide(P, b)
    assert await redis.zscore(finished, b) is None
    other = await batch(store, stopped_at=NOW)
    await store.purge(P, other)
    assert await listed_in(redis, other) == []


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
    recent = await batch(store, stopped_at=NOW - timedelta(days=29))
    running = await batch(store, stopped_at=None)
    created_long_ago = await batch(store, stopped_at=None)
    await redis.hset(keys.batch(P, created_long_ago), "created_at", iso(NOW - timedelta(days=90)))
    kept = {b: await rendered(redis, b) for b in (recent, running, created_long_ago)}
    part = await sweeper(retention)
    try:
        await part.snapshots.write_current([(P, b) for b in (old, recent, running)])
        feed = redis.pubsub()
        await feed.subscribe(keys.CHANGES_CHANNEL)
        assert await part.sweep_once() == 1
        message: dict[str, Any] | None = None
        async with asyncio.timeout(5):
            while message is None or message["type"] != "message":
                message = await feed.get_message(timeout=1)
        assert message["data"] == keys.batch(P, old)  # the caches evict it, as after a purge
        await feed.aclose()  # type: ignore[no-untyped-call]
        for key in every_key(old):
            assert not await redis.exists(key)
        assert await listed_in(redis, old) == []
        assert {b: await rendered(redis, b) for b in kept} == kept
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
    assert keys.batch_finished_index(P) in await listed_in(redis, old)


async def test_stopped_batches_from_before_the_finished_index_are_indexed_once(
        retention: Settings, redis: Redis, scripts: Scripts) -> None:
    """As after an upgrade, or a rebuild (which restores hashes and the list's indexes): the
    first round indexes the stopped batches by their `updated_at`, then sweeps."""
    store = BatchStore.from_settings(redis, retention, scripts)
    await redis.sadd(keys.PIPELINES, P)
    old = await batch(store, stopped_at=NOW - timedelta(days=40))
    recent = await batch(store, stopped_at=NOW - timedelta(days=1))
    await redis.delete(keys.batch_finished_index(P))
    part = await sweeper(retention)
    try:
        assert await part.sweep_once() == 1
        assert not await redis.exists(keys.batch(P, old))
        assert await redis.zscore(keys.batch_finished_index(P), recent) == (
            datetime.fromisoformat(cast(str, await redis.hget(keys.batch(P, recent), "updated_at")))
            .timestamp())
        # Indexed once: a batch dropped from the index now stays out of it.
        await redis.zrem(keys.batch_finished_index(P), recent)
        assert await part.sweep_once() == 0
        assert await redis.zscore(keys.batch_finished_index(P), recent) is None
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
        for _ in range(20):
            await asyncio.gather(*(batch(store, stopped_at=NOW - timedelta(days=1))
                                   for _ in range(50)))
        old = [await batch(store, stopped_at=NOW - timedelta(days=60)) for _ in range(3)]
        part = await sweeper(own)
        try:
            await part.backfill(P)  # once per pipeline and process: not the round's cost
            await store.purge(P, "batch-none")  # loads the purge's script: not the round's cost
            await redis.config_resetstat()
            assert await part.sweep_once() == 3
            stats = await redis.info("commandstats")
        finally:
            await part.stop()
        calls = {name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items()}
        calls.pop("config|resetstat", None)
        # One read of the pipelines, the marker, one range; a purge per expired batch (the
        # commands its script runs are counted too: each index's ZREM, the created entry's
        # read, the DEL, the change message). None grows with the 1,000 batches kept.
        per_purge = {"evalsha": 1, "hmget": 1, "del": 1, "publish": 1,
                     "zrem": 3 + len(keys.batch_filter_indexes(P))}
        assert calls == {"smembers": 1, "exists": 1, "zrangebyscore": 1,
                         **{name: 3 * n for name, n in per_purge.items()}}
        assert all([not await redis.exists(keys.batch(P, b)) for b in old])
        assert await redis.zcard(keys.batch_finished_index(P)) == 1_000
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
        assert part.swept == 5 and await redis.exists(keys.batch(P, recent))
    finally:
        await part.stop()
        await task
