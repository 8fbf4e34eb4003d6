"""The list's indexes on a real Redis: CREATE_BATCH (and CREATE_LATEST_BATCH), APPLY_EVENTS,
HIDE_BATCH, ABANDON_BATCH and PURGE_BATCH keep the per-state, per-outcome and created indexes;
PAGE_RANGE turns created bounds into sequence bounds; BACKFILL_INDEXES indexes batches from
before the indexes."""

from __future__ import annotations

from typing import Any, cast

import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from core import keys
from core.api_scripts import ApiScripts
from core.codec import Event
from core.models import BATCH_STATES, OUTCOMES
from core.paging import ListFilter
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
    for name, key in zip([*BATCH_STATES, *OUTCOMES], keys.batch_filter_indexes(P), strict=True):
        score = await redis.zscore(key, batch_id)
        if score is not None:
            found[name] = score
    return found


async def created_members(redis: Redis) -> list[str]:
    return cast(list[str], await redis.zrange(keys.batch_created_index(P), 0, -1))


def stop(batch_id: str, outcome: str, ts: float) -> Event:
    return Event("batch.state", batch_id, P, state="stop", outcome=outcome, ts=ts)


async def test_create_indexes_the_batch_as_pending_with_its_created_entry(
        store: BatchStore, redis: Redis) -> None:
    seq = await store.create(P, "b1", spec())
    fields = cast(dict[str, str], await redis.hgetall(keys.batch(P, "b1")))
    assert await where(redis, "b1") == {"pending": seq}
    assert await created_members(redis) == [f"{fields['created_at']}|{seq:016d}"]


async def test_a_create_that_reaches_redis_late_takes_the_newest_created_at(
        scripts: Scripts, redis: Redis) -> None:
    """Two API processes: the one whose clock read first lands second. Its created_at (and
    updated_at) is raised to the newest batch's, so created_at follows the sequence."""

    async def create(batch_id: str, at: str) -> Any:
        return await scripts.create_batch(
            keys=[keys.batch(P, batch_id), keys.batch_index(P), keys.batch_seq(P),
                  keys.batch_created_index(P), keys.batch_state_index(P, "pending")],
            args=[batch_id, "id", batch_id, "state", "pending", "created_at", at,
                  "updated_at", at])

    assert await create("late-clock", "2030-01-01T00:00:00.500Z") == 1
    assert await create("early-clock", "2030-01-01T00:00:00.200Z") == 2
    early = await redis.hgetall(keys.batch(P, "early-clock"))
    assert early["created_at"] == early["updated_at"] == "2030-01-01T00:00:00.500Z"
    assert await created_members(redis) == ["2030-01-01T00:00:00.500Z|0000000000000001",
                                            "2030-01-01T00:00:00.500Z|0000000000000002"]
    # A created_at the index cannot order (not fixed-width UTC) is refused before anything
    # is written, the sequence included.
    with pytest.raises(ResponseError, match="created_at"):
        await create("odd", "2030-01-01T00:00:00+00:00")
    assert not await redis.exists(keys.batch(P, "odd"))
    assert await redis.get(keys.batch_seq(P)) == "2"


async def test_create_latest_batch_indexes_as_create_batch_and_reads_the_order_last(
        store: BatchStore, redis: Redis) -> None:
    batch_keys, args = await create_call(redis, P, "b1", spec())
    await redis.rpush(keys.pipeline_order(P), "1")
    seq = await ApiScripts(redis).create_latest_batch(
        keys=[*batch_keys, keys.pipeline_order(P)], args=["1", orjson.dumps(args)])
    assert seq == 1
    assert await where(redis, "b1") == {"pending": 1}
    assert len(await created_members(redis)) == 1


async def test_events_move_the_batch_between_state_and_outcome_indexes(
        store: BatchStore, redis: Redis) -> None:
    seq = await store.create(P, "b1", spec())
    await store.apply([Event("batch.state", "b1", P, state="scheduled")])
    assert await where(redis, "b1") == {"scheduled": seq}
    await store.apply([Event("batch.state", "b1", P, state="running")])
    assert await where(redis, "b1") == {"running": seq}
    await store.apply([stop("b1", "cancelled", T0)])
    assert await where(redis, "b1") == {"stop": seq, "cancelled": seq}
    # Prefect's Cancelled -> Running -> Completed: the later stop decides the outcome.
    await store.apply([stop("b1", "completed", T0 + 1)])
    assert await where(redis, "b1") == {"stop": seq, "completed": seq}
    await store.apply([stop("b1", "failed", T0 - 1)])  # older: changes nothing
    assert await where(redis, "b1") == {"stop": seq, "completed": seq}


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
        "b0": {"stop": seqs["b0"], "failed": seqs["b0"]}, "b1": {"running": seqs["b1"]},
        "b2": {"running": seqs["b2"]}, "b3": {"pending": seqs["b3"]},
        "b4": {"pending": seqs["b4"]}}


async def test_hide_and_purge_take_the_batch_out_of_every_index(
        store: BatchStore, redis: Redis) -> None:
    await store.create(P, "b1", spec())
    await store.create(P, "b2", spec())
    await store.apply([stop("b1", "completed", T0), stop("b2", "failed", T0)])
    assert await store.hide(P, "b1")
    assert await where(redis, "b1") == {}
    assert [m[-1] for m in await created_members(redis)] == ["2"]
    await store.purge(P, "b1")
    await store.purge(P, "b2")  # never hidden (an undone create): purged all the same
    assert await where(redis, "b2") == {}
    assert await created_members(redis) == []
    assert not await redis.exists(keys.batch(P, "b1"), keys.batch(P, "b2"))


async def test_abandon_unlists_with_the_indexes_given_and_works_without(
        store: BatchStore, redis: Redis) -> None:
    api_scripts = ApiScripts(redis)
    for batch_id in ("b1", "b2"):
        await store.create(P, batch_id, spec())
    base = [keys.batch_index(P)]
    args: list[Any] = ["2030-01-01T00:00:00.000Z", "kafka timed out", 60, ""]
    assert await api_scripts.abandon_batch(
        keys=[keys.batch(P, "b1"), *base, keys.batch_seen(P, "b1"), keys.batch_created_index(P),
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
    assert await created_members(redis) == []


async def page_range(scripts: Scripts, top: str, after: str, before: str,
                     ranked: str | None = None) -> list[str]:
    flat = await scripts.page_range(
        keys=[ranked or keys.batch_index(P), keys.batch_created_index(P)],
        args=[top, after, before, 100])
    return cast(list[str], flat[::2])


async def test_page_range_turns_created_bounds_into_sequence_bounds(
        scripts: Scripts, redis: Redis) -> None:
    times = ["2030-01-01T00:00:00.000Z", "2030-01-01T00:00:01.000Z", "2030-01-01T00:00:01.000Z",
             "2030-01-01T00:00:02.000Z", "2030-01-01T00:00:03.000Z"]
    for n, at in enumerate(times, start=1):
        await scripts.create_batch(
            keys=[keys.batch(P, f"b{n}"), keys.batch_index(P), keys.batch_seq(P),
                  keys.batch_created_index(P), keys.batch_state_index(P, "pending")],
            args=[f"b{n}", "state", "pending", "created_at", at])
    assert await page_range(scripts, "+inf", "-", "+") == ["b5", "b4", "b3", "b2", "b1"]
    # at or after 1 s (both batches of that millisecond), strictly before 3 s
    assert await page_range(scripts, "+inf", "[2030-01-01T00:00:01.000Z",
                            "(2030-01-01T00:00:03.000Z") == ["b4", "b3", "b2"]
    assert await page_range(scripts, "+inf", "-", "(2030-01-01T00:00:01.000Z") == ["b1"]
    # the cursor (highest sequence wanted) under the bounds
    assert await page_range(scripts, "3", "[2030-01-01T00:00:01.000Z", "+") == ["b3", "b2"]
    assert await page_range(scripts, "+inf", "[2030-01-01T00:00:04.000Z", "+") == []
    assert await page_range(scripts, "+inf", "-", "(2030-01-01T00:00:00.000Z") == []
    # on a filter index: its own members only, within the same bounds
    await redis.zrem(keys.batch_state_index(P, "pending"), "b3")
    assert await page_range(scripts, "+inf", "[2030-01-01T00:00:01.000Z", "+",
                            keys.batch_state_index(P, "pending")) == ["b5", "b4", "b2"]


async def test_backfill_indexes_batches_from_before_the_indexes_and_repairs_stale_entries(
        store: BatchStore, redis: Redis) -> None:
    for batch_id in ("b1", "b2", "b3", "b4"):
        await store.create(P, batch_id, spec())
    await store.apply([Event("batch.state", "b2", P, state="running"),
                       stop("b3", "cancelled", T0)])
    await store.hide(P, "b4")
    before = {b: await where(redis, b) for b in ("b1", "b2", "b3")}
    created = await created_members(redis)
    # As a database from before the indexes: none of them, and one stale entry (a process
    # running older code moved b2 on without the index knowing).
    await redis.delete(keys.batch_created_index(P), *keys.batch_filter_indexes(P))
    await redis.zadd(keys.batch_state_index(P, "pending"), {"b2": 2})
    await redis.zadd(keys.batch_state_index(P, "pending"), {"b4": 4})  # hidden: left alone

    assert await store._pager.backfill(P) == 3
    assert {b: await where(redis, b) for b in ("b1", "b2", "b3")} == before
    assert await created_members(redis) == created
    assert await store._pager.backfill(P) == 3  # idempotent
    assert {b: await where(redis, b) for b in ("b1", "b2", "b3")} == before


async def test_a_filtered_page_reads_its_own_rows_only_whatever_the_history(
        private_redis: PrivateRedis) -> None:
    """3 running batches under 1,000 stopped ones: a `state=running` page costs one range
    read and one HGETALL per batch it returns; a created window adds one script call. (The
    filter scanning the history would read the 1,000.)"""
    redis = Redis(port=private_redis.port, decode_responses=True)
    try:
        store = BatchStore(redis, Scripts(redis), token_secret=b"t", changes_channel="")
        running = [f"r{n}" for n in range(3)]
        stopped = [f"s{n:04d}" for n in range(1_000)]
        for batch_id in running + stopped:
            await store.create(P, batch_id, spec())
        await store.apply([Event("batch.state", b, P, state="running") for b in running]
                          + [stop(b, "completed", T0) for b in stopped])
        where = ListFilter(state="running")
        await store.page(P, 100, None, where)  # a process's first filtered page checks the marker

        async def calls(filter_: ListFilter) -> tuple[list[str], dict[str, int]]:
            await redis.config_resetstat()
            page = await store.page(P, 100, None, filter_)
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
        assert counted == {"evalsha": 1, "zrangebylex": 1, "zrevrangebyscore": 1, "hgetall": 3}
    finally:
        await redis.aclose()
