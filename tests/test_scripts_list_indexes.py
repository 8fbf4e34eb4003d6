"""The list's indexes on a real Redis: CREATE_BATCH (and CREATE_LATEST_BATCH), APPLY_EVENTS,
HIDE_BATCH, ABANDON_BATCH and PURGE_BATCH keep the per-state (pending, scheduled, running)
and per-outcome indexes, and APPLY_EVENTS the finished buckets; PAGE_RANGE turns created
bounds into sequence bounds by a binary search of the batch index and merges the outcome
indexes for `state=stop`; BACKFILL_INDEXES indexes batches from before the indexes and
deletes the retired ones."""

from __future__ import annotations

from typing import Any, cast

import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from core import keys
from core.api_scripts import ApiScripts
from core.codec import Event
from core.keys import INDEXED_STATES
from core.list_filter import ListFilter
from core.models import OUTCOMES
from core.scripts import Scripts
from core.store import BatchStore
from tests.conftest import PrivateRedis
from tests.helpers import create_call, spec

P = "pipe"
T0 = 1_760_000_000.0


@pytest.fixture
def store(redis: Redis, scripts: Scripts) -> BatchStore:
    return BatchStore(redis, scripts, token_secret=b"secret", changes_channel="")


async def where(redis: Redis, batch_id: str) -> dict[str, float]:
    """Each filter index holding the batch (by its key's last part) -> its score there."""
    found: dict[str, float] = {}
    for name, key in zip([*INDEXED_STATES, *OUTCOMES], keys.batch_filter_indexes(P),
                         strict=True):
        score = await redis.zscore(key, batch_id)
        if score is not None:
            found[name] = score
    return found


async def retired(redis: Redis) -> list[str]:
    """The retired indexes that exist (none is written any more)."""
    return [key for key in keys.batch_retired_keys(P) if await redis.exists(key)]


def stop(batch_id: str, outcome: str, ts: float) -> Event:
    return Event("batch.state", batch_id, P, state="stop", outcome=outcome, ts=ts)


async def test_create_indexes_the_batch_as_pending_and_writes_no_retired_index(
        store: BatchStore, redis: Redis) -> None:
    seq = await store.create(P, "b1", spec())
    assert await where(redis, "b1") == {"pending": seq}
    assert await redis.zscore(keys.batch_index(P), "b1") == seq
    assert await retired(redis) == []
    # The pipeline's first batch: no stopped batch predates the finished buckets.
    assert await redis.get(keys.batch_finished_indexed(P)) == "1"
    await redis.delete(keys.batch_finished_indexed(P))
    await store.create(P, "b2", spec())
    assert not await redis.exists(keys.batch_finished_indexed(P))


async def test_a_create_that_reaches_redis_late_takes_the_newest_created_at(
        scripts: Scripts, redis: Redis) -> None:
    """Two API processes: the one whose clock read first lands second. Its created_at (and
    updated_at) is raised to the newest batch's, so created_at follows the sequence."""

    async def create(batch_id: str, at: str) -> Any:
        return await scripts.create_batch(
            keys=[keys.batch(P, batch_id), keys.batch_index(P), keys.batch_seq(P),
                  keys.batch_state_index(P, "pending")],
            args=[batch_id, "id", batch_id, "state", "pending", "created_at", at,
                  "updated_at", at])

    assert await create("late-clock", "2030-01-01T00:00:00.500Z") == 1
    assert await create("early-clock", "2030-01-01T00:00:00.200Z") == 2
    early = await redis.hgetall(keys.batch(P, "early-clock"))
    assert early["created_at"] == early["updated_at"] == "2030-01-01T00:00:00.500Z"
    # The newest batch is the batch index's last: one hidden (out of the index) is not read.
    assert await create("hidden", "2030-01-01T00:00:09.000Z") == 3
    await redis.zrem(keys.batch_index(P), "hidden")
    assert await create("after-hidden", "2030-01-01T00:00:01.000Z") == 4
    assert await redis.hget(keys.batch(P, "after-hidden"), "created_at") == (
        "2030-01-01T00:00:01.000Z")
    # The newest's hash gone (never so but by hand): the next newest that has one counts.
    await redis.delete(keys.batch(P, "after-hidden"))
    assert await create("gone-before", "2030-01-01T00:00:00.900Z") == 5
    assert await redis.hget(keys.batch(P, "gone-before"), "created_at") == (
        "2030-01-01T00:00:00.900Z")
    assert await retired(redis) == []
    # A created_at the index cannot order (not fixed-width UTC) is refused before anything
    # is written, the sequence included.
    with pytest.raises(ResponseError, match="created_at"):
        await create("odd", "2030-01-01T00:00:00+00:00")
    assert not await redis.exists(keys.batch(P, "odd"))
    assert await redis.get(keys.batch_seq(P)) == "5"


async def test_create_latest_batch_indexes_as_create_batch_and_reads_the_order_last(
        store: BatchStore, redis: Redis) -> None:
    batch_keys, args = await create_call(redis, P, "b1", spec())
    await redis.rpush(keys.pipeline_order(P), "1")
    seq = await ApiScripts(redis).create_latest_batch(
        keys=[*batch_keys, keys.pipeline_order(P)], args=["1", orjson.dumps(args)])
    assert seq == 1
    assert await where(redis, "b1") == {"pending": 1}
    assert await retired(redis) == []


async def test_events_move_the_batch_between_state_and_outcome_indexes(
        store: BatchStore, redis: Redis) -> None:
    seq = await store.create(P, "b1", spec())
    await store.apply([Event("batch.state", "b1", P, state="scheduled")])
    assert await where(redis, "b1") == {"scheduled": seq}
    await store.apply([Event("batch.state", "b1", P, state="running")])
    assert await where(redis, "b1") == {"running": seq}
    await store.apply([stop("b1", "cancelled", T0)], now="2030-01-01T05:59:59.999Z")
    # `stop` has no index: the outcome's holds the batch. It enters its hour's bucket.
    assert await where(redis, "b1") == {"cancelled": seq}
    bucket = keys.batch_finished_hour(P, "2030010105")
    assert await redis.lrange(bucket, 0, -1) == ["b1"]
    assert await redis.zrange(keys.batch_finished_index(P), 0, -1, withscores=True) == [
        ("2030010105", 1_893_474_000)]  # 2030-01-01T05:00:00Z
    # Prefect's Cancelled -> Running -> Completed: the later stop decides the outcome.
    await store.apply([stop("b1", "completed", T0 + 1)], now="2030-01-01T06:00:00.000Z")
    assert await where(redis, "b1") == {"completed": seq}
    await store.apply([stop("b1", "failed", T0 - 1)])  # older: changes nothing
    assert await where(redis, "b1") == {"completed": seq}
    # Bucketed once: a later stop moves no batch to another hour.
    assert await redis.lrange(bucket, 0, -1) == ["b1"]
    assert await redis.zcard(keys.batch_finished_index(P)) == 1
    assert await retired(redis) == []


async def test_events_that_change_neither_state_nor_outcome_touch_no_index(
        store: BatchStore, redis: Redis) -> None:
    """The hot path: offsets and step states write no index. Shown by an index entry
    removed behind the script's back staying removed."""
    await store.create(P, "b1", spec())
    await store.apply([Event("batch.state", "b1", P, state="running")])
    await redis.zrem(keys.batch_state_index(P, "running"), "b1")
    await store.apply([
        Event("step.state", "b1", P, step="extract", state="running"),
        Event("step.offsets", "b1", P, step="extract", offsets={"p0": 5}),
        Event("batch.state", "b1", P, state="scheduled"),  # backwards: ignored
    ])
    assert await where(redis, "b1") == {}


async def test_many_batches_in_one_call_each_move_alone(store: BatchStore, redis: Redis) -> None:
    ids = [f"b{n}" for n in range(5)]
    seqs = {b: await store.create(P, b, spec()) for b in ids}
    await store.apply([Event("batch.state", b, P, state="running") for b in ids[:3]]
                      + [stop(ids[0], "failed", T0)])
    assert {b: await where(redis, b) for b in ids} == {
        "b0": {"failed": seqs["b0"]}, "b1": {"running": seqs["b1"]},
        "b2": {"running": seqs["b2"]}, "b3": {"pending": seqs["b3"]},
        "b4": {"pending": seqs["b4"]}}


async def test_hide_and_purge_take_the_batch_out_of_every_index(
        store: BatchStore, redis: Redis) -> None:
    await store.create(P, "b1", spec())
    await store.create(P, "b2", spec())
    await store.apply([stop("b1", "completed", T0), stop("b2", "failed", T0)])
    bucket = cast(list[str], await redis.zrange(keys.batch_finished_index(P), 0, -1))
    assert await store.hide(P, "b1")
    assert await where(redis, "b1") == {}
    assert await redis.zscore(keys.batch_index(P), "b1") is None
    await store.purge(P, "b1")
    await store.purge(P, "b2")  # never hidden (an undone create): purged all the same
    assert await where(redis, "b2") == {}
    assert not await redis.exists(keys.batch(P, "b1"), keys.batch(P, "b2"))
    assert await redis.zcard(keys.batch_index(P)) == 0
    # The buckets keep their ids (the sweeper skips gone batches): no O(n) LREM.
    assert await redis.lrange(keys.batch_finished_hour(P, bucket[0]), 0, -1) == ["b1", "b2"]


async def test_abandon_unlists_with_the_indexes_given_and_works_without(
        store: BatchStore, redis: Redis) -> None:
    api_scripts = ApiScripts(redis)
    for batch_id in ("b1", "b2"):
        await store.create(P, batch_id, spec())
    base = [keys.batch_index(P)]
    args: list[Any] = ["2030-01-01T00:00:00.000Z", "kafka timed out", 60, ""]
    assert await api_scripts.abandon_batch(
        keys=[keys.batch(P, "b1"), *base, keys.batch_seen(P, "b1"),
              *keys.batch_filter_indexes(P)], args=["b1", *args]) == 1
    assert await where(redis, "b1") == {}
    # A caller naming only the first three keys (as before the indexes): still abandoned;
    # the filtered list drops it by its hash until the delete purges it.
    assert await api_scripts.abandon_batch(
        keys=[keys.batch(P, "b2"), *base, keys.batch_seen(P, "b2")], args=["b2", *args]) == 1
    assert await redis.hget(keys.batch(P, "b2"), "deleted") == "1"
    assert await where(redis, "b2") == {"pending": 2}
    await store.purge(P, "b2")
    assert await where(redis, "b2") == {}


async def page_range(scripts: Scripts, top: str, after: str, before: str,
                     *ranked: str, limit: int = 100) -> list[str]:
    flat = await scripts.page_range(
        keys=[keys.batch_index(P), *(ranked or [keys.batch_index(P)])],
        args=[top, after, before, limit, keys.batch(P, "")])
    return cast(list[str], flat[::2])


async def create_at(scripts: Scripts, times: list[str]) -> None:
    for n, at in enumerate(times, start=1):
        await scripts.create_batch(
            keys=[keys.batch(P, f"b{n}"), keys.batch_index(P), keys.batch_seq(P),
                  keys.batch_state_index(P, "pending")],
            args=[f"b{n}", "state", "pending", "created_at", at])


async def test_page_range_turns_created_bounds_into_sequence_bounds(
        scripts: Scripts, redis: Redis) -> None:
    await create_at(scripts, [
        "2030-01-01T00:00:00.000Z", "2030-01-01T00:00:01.000Z", "2030-01-01T00:00:01.000Z",
        "2030-01-01T00:00:02.000Z", "2030-01-01T00:00:03.000Z"])
    assert await page_range(scripts, "+inf", "", "") == ["b5", "b4", "b3", "b2", "b1"]
    # at or after 1 s (both batches of that millisecond), strictly before 3 s
    assert await page_range(scripts, "+inf", "2030-01-01T00:00:01.000Z",
                            "2030-01-01T00:00:03.000Z") == ["b4", "b3", "b2"]
    assert await page_range(scripts, "+inf", "", "2030-01-01T00:00:01.000Z") == ["b1"]
    assert await page_range(scripts, "+inf", "", "2030-01-01T00:00:00.001Z") == ["b1"]
    # the cursor (highest sequence wanted) under the bounds
    assert await page_range(scripts, "3", "2030-01-01T00:00:01.000Z", "") == ["b3", "b2"]
    assert await page_range(scripts, "+inf", "2030-01-01T00:00:03.001Z", "") == []
    assert await page_range(scripts, "+inf", "", "2030-01-01T00:00:00.000Z") == []
    assert await page_range(scripts, "+inf", "2029-01-01T00:00:00.000Z",
                            "2031-01-01T00:00:00.000Z") == ["b5", "b4", "b3", "b2", "b1"]
    # on a filter index: its own members only, within the same bounds
    await redis.zrem(keys.batch_state_index(P, "pending"), "b3")
    assert await page_range(scripts, "+inf", "2030-01-01T00:00:01.000Z", "",
                            keys.batch_state_index(P, "pending")) == ["b5", "b4", "b2"]
    # A member whose hash is gone reads as the next member's created_at: the bounds around
    # it stay right (b4 reads as b5's 3 s; the page drops a gone batch when it reads hashes).
    await redis.delete(keys.batch(P, "b2"), keys.batch(P, "b4"))
    assert await page_range(scripts, "+inf", "2030-01-01T00:00:01.000Z",
                            "2030-01-01T00:00:03.000Z") == ["b3", "b2"]
    assert await page_range(scripts, "+inf", "2030-01-01T00:00:02.000Z", "") == ["b5", "b4"]
    await redis.delete(keys.batch(P, "b5"))  # the top's gone too: past every bound
    assert await page_range(scripts, "+inf", "2030-01-01T00:00:01.500Z", "") == ["b5", "b4"]
    # (rows without a hash: the page's read of the hashes drops them)
    assert await page_range(scripts, "+inf", "2031-01-01T00:00:00.000Z", "") == ["b5", "b4"]
    assert await page_range(scripts, "+inf", "", "2030-01-01T00:00:01.000Z") == ["b1"]
    # an empty pipeline
    await redis.delete(keys.batch_index(P))
    assert await page_range(scripts, "+inf", "2030-01-01T00:00:00.000Z", "") == []
    assert await page_range(scripts, "+inf", "", "2030-01-01T00:00:00.000Z") == []


async def test_page_range_merges_several_sets_newest_first_within_the_bounds(
        scripts: Scripts, redis: Redis) -> None:
    """`state=stop`: the outcome indexes merged by sequence, each read up to the limit."""
    await create_at(scripts, [f"2030-01-01T00:00:{n:02d}.000Z" for n in range(12)])
    outcomes = [keys.batch_outcome_index(P, o) for o in ("completed", "failed", "cancelled")]
    for n in range(1, 13):
        await redis.zadd(outcomes[n % 3] if n != 12 else outcomes[0], {f"b{n}": n})
    everyone = [f"b{n}" for n in range(12, 0, -1)]
    assert await page_range(scripts, "+inf", "", "", *outcomes) == everyone
    assert await page_range(scripts, "+inf", "", "", *outcomes, limit=4) == everyone[:4]
    assert await page_range(scripts, "7", "", "", *outcomes, limit=3) == ["b7", "b6", "b5"]
    assert await page_range(scripts, "9", "2030-01-01T00:00:03.000Z",
                            "2030-01-01T00:00:08.000Z", *outcomes) == [
        "b8", "b7", "b6", "b5", "b4"]
    assert await page_range(scripts, "+inf", "", "", outcomes[1]) == ["b10", "b7", "b4", "b1"]
    # an empty set among them, and none holding anything
    empty = keys.batch_outcome_index(P, "crashed")
    assert await page_range(scripts, "3", "", "", *outcomes, empty) == ["b3", "b2", "b1"]
    assert await page_range(scripts, "+inf", "", "", empty, empty) == []


async def test_backfill_indexes_batches_from_before_the_indexes_and_deletes_the_retired(
        store: BatchStore, redis: Redis) -> None:
    for batch_id in ("b1", "b2", "b3", "b4"):
        await store.create(P, batch_id, spec())
    await store.apply([Event("batch.state", "b2", P, state="running"),
                       stop("b3", "cancelled", T0)])
    await store.hide(P, "b4")
    before = {b: await where(redis, b) for b in ("b1", "b2", "b3")}
    # As a database from before the indexes: none of them, and one stale entry (a process
    # running older code moved b2 on without the index knowing) ...
    await redis.delete(*keys.batch_filter_indexes(P))
    await redis.zadd(keys.batch_state_index(P, "pending"), {"b2": 2})
    await redis.zadd(keys.batch_state_index(P, "pending"), {"b4": 4})  # hidden: left alone
    # ... or from before the finished buckets: the retired indexes and their markers.
    stale = keys.batch_retired_keys(P)
    for key in stale:
        await redis.zadd(key, {"b3": 3})

    assert await store._pager.backfill(P) == 3
    assert {b: await where(redis, b) for b in ("b1", "b2", "b3")} == before
    assert await retired(redis) == []
    assert await store._pager.backfill(P) == 3  # idempotent
    assert {b: await where(redis, b) for b in ("b1", "b2", "b3")} == before


async def test_a_filtered_page_reads_its_own_rows_only_whatever_the_history(
        private_redis: PrivateRedis) -> None:
    """3 running batches under 1,000 stopped ones: a `state=running` page costs one range
    read and one HGETALL per batch it returns; a created window adds one script call, whose
    binary searches read O(log n) ranks and `created_at`s. `state=stop` reads each outcome's
    index up to the limit, whatever the history. (A filter scanning the history would read
    the 1,000.)"""
    redis = Redis(port=private_redis.port, decode_responses=True)
    try:
        store = BatchStore(redis, Scripts(redis), token_secret=b"t", changes_channel="")
        running = [f"r{n}" for n in range(3)]
        stopped = [f"s{n:04d}" for n in range(1_000)]
        for batch_id in running + stopped:
            await store.create(P, batch_id, spec())
        await store.apply([Event("batch.state", b, P, state="running") for b in running]
                          + [stop(b, "completed" if n % 2 else "failed", T0)
                             for n, b in enumerate(stopped)])
        where = ListFilter(state="running")
        await store.page(P, 100, None, where)  # a process's first filtered page checks the marker

        async def calls(filter_: ListFilter, limit: int = 100
                        ) -> tuple[list[str], dict[str, int]]:
            await redis.config_resetstat()
            page = await store.page(P, limit, None, filter_)
            stats = await redis.info("commandstats")
            return list(page.items), {name.removeprefix("cmdstat_"): value["calls"]
                                      for name, value in stats.items() if "config" not in name}

        assert await calls(where) == (running[::-1], {"zrevrangebyscore": 1, "hgetall": 3})
        first = await store.get(P, running[0])
        assert first is not None
        window = ListFilter(state="running", created_after=first["created_at"])
        await store.page(P, 100, None, window)  # loads PAGE_RANGE (a first EVALSHA misses)
        items, counted = await calls(window)
        assert items == running[::-1]
        # 1,003 batches: 11 probes of a binary search (one more for the bound's sequence)
        probes = 1_003 .bit_length() + 1
        assert counted.pop("zrange") <= probes and counted.pop("hget") <= probes
        assert counted == {"evalsha": 1, "zcard": 1, "zrevrangebyscore": 1, "hgetall": 3}
        # state=stop: the 4 outcome indexes merged, each read a chunk (a quarter of the
        # page's rows and one) at a time: 4 reads, and at most one more per chunk the page
        # takes from them
        for limit in (5, 100):
            items, counted = await calls(ListFilter(state="stop"), limit=limit)
            assert items == stopped[:-limit - 1:-1]
            chunk = -(-(limit + 1) // 4) + 1
            assert counted.pop("zrevrangebyscore") <= 4 + (limit + 1) // chunk + 1
            assert counted == {"evalsha": 1, "hgetall": limit}
    finally:
        await redis.aclose()
