"""RESTORE_HASHES (core.restore) on a real Redis: a rebuild writes each hash back as its
snapshot holds it. Packed and pre-packing snapshots: tests/test_store_packing.py."""

from __future__ import annotations

import time

import orjson
import pytest
from redis.asyncio import Redis

from core import keys, restore
from core.command_messages import Recorded, Run
from core.list_filter import ListFilter
from core.paging import Pager
from core.restore import Restored, restore_batches
from core.restore_runs import highest_seqs
from core.scripts import Scripts
from core.snapshots import Snapshot
from core.store import BatchStore
from tests.helpers import spec
from tests.test_consumers_support import unique
from tests.test_store_packing import P, finished, large_running, raw


@pytest.fixture
async def store(redis: Redis, scripts: Scripts) -> BatchStore:
    return BatchStore(redis, scripts, token_secret=b"secret", dedup_window=4)


async def test_a_running_batch_of_more_values_than_lua_unpacks_at_once_is_restored(
        store: BatchStore, redis: Redis, scripts: Scripts) -> None:
    """RESTORE_HASHES wrote each hash with one HSET of unpack(its fields): a running batch of
    3 steps x 670 partitions (offsets and totals: 8,000+ values) failed the rebuild."""
    batch_id = await large_running(store)
    fields = await raw(redis, batch_id)
    assert 2 * len(fields) > 8000
    await redis.flushdb()
    await restore_batches(redis, store, Pager(redis, scripts, b"secret"),
                          [Snapshot(P, batch_id, fields)], set(), Restored())
    assert await raw(redis, batch_id) == fields
    assert await redis.zscore(keys.batch_index(P), batch_id) == int(fields["seq"])


async def test_restore_calls_are_bounded_by_bytes_as_well_as_by_count(
        store: BatchStore, redis: Redis, scripts: Scripts,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A call carried 500 hashes whatever their size: with ~10 MB batches (snapshots are
    compressed to fit a record) one argument would pass Redis's 512 MB bulk limit."""
    large = [await large_running(store) for _ in range(3)]
    small = await finished(store)
    ids = [large[0], small, large[1], large[2]]
    before = {b: await raw(redis, b) for b in ids}
    snaps = [Snapshot(P, b, before[b]) for b in ids]
    one = len(next(restore.restore_calls(snaps[:1]))[1])
    monkeypatch.setattr(restore, "CHUNK_BYTES", one + 2_000)  # a large one and the small one
    calls = list(restore.restore_calls(snaps))
    assert [c[0] for c in calls] == [[large[0], small], [large[1]], [large[2]]]
    assert all(len(arg) <= one + 2_000 for _, arg in calls)
    assert [row[0] for _, arg in calls for row in orjson.loads(arg)] == ids
    monkeypatch.setattr(restore, "CHUNK_BYTES", 1_000)  # below any one hash: each alone
    assert [c[0] for c in restore.restore_calls(snaps)] == [[b] for b in ids]
    await redis.flushdb()
    await restore_batches(redis, store, Pager(redis, scripts, b"secret"), snaps, set(),
                          Restored())
    assert {b: await raw(redis, b) for b in ids} == before
    assert await redis.zcard(keys.batch_index(P)) == len(ids)


async def test_a_paging_token_from_before_a_rebuild_does_not_list_batches_created_after_it(
        store: BatchStore, redis: Redis, scripts: Scripts) -> None:
    """A token continues strictly below the sequence of the last batch its page read. The
    counter was set to the highest sequence restored: with the newest batches purged before
    the loss it went back, and a new batch reused a sequence an earlier token lists below.
    Their run commands (still on the topic) recorded their sequences."""
    p = unique("test-seq")
    ids = [unique("batch") for _ in range(3)]
    runs = [Run(schema=1, event_id=f"run-{b}", batch_id=b, pipeline_id=p, ts=time.time(),
                recorded=Recorded(seq=await store.create(p, b, spec()),
                                  created_at="2026-12-01T00:00:00.000Z"))
            for b in ids]
    first = await store.page(p, 1, None)
    assert list(first.items) == [ids[2]] and first.token

    async def new_batch_then_page_two() -> list[str]:
        await store.create(p, "batch-new", spec())
        return list((await store.page(p, 10, first.token)).items)

    for b in ids[1:]:  # the two newest deleted and purged
        await store.purge(p, b)
    left = [Snapshot(p, ids[0], dict(await raw(redis, ids[0], p)))]
    assert await new_batch_then_page_two() == [ids[0]]
    # The same after Redis was lost and rebuilt from the batch left and the run commands.
    await redis.flushdb()
    await restore_batches(redis, store, Pager(redis, scripts, b"secret"), left, set(),
                          Restored(), seqs=highest_seqs(runs))
    assert await new_batch_then_page_two() == [ids[0]]
    # A pipeline whose batches were all purged keeps its counter too.
    await redis.flushdb()
    await restore_batches(redis, store, Pager(redis, scripts, b"secret"), [], set(),
                          Restored(), seqs=highest_seqs(runs))
    assert await store.create(p, "batch-later", spec()) == 4


async def test_a_forced_restore_over_older_data_keeps_the_filters_and_buckets_true(
        store: BatchStore, redis: Redis, scripts: Scripts) -> None:
    """`rebuild --force` writes into a Redis that is not empty (an older backup, an AOF that
    lost its last second): there the filter indexes' and the finished buckets' markers are
    set already (a filtered page, a pipeline's first batch), and their backfills, skipped,
    left a batch the snapshot says stopped in the `pending` index, in no outcome's and in
    no finished bucket (never listed as stopped, never purged by the retention)."""
    p = unique("test-force")
    await store.create(p, "b0", spec())  # pending here
    pager = Pager(redis, scripts, b"secret")
    await pager.ensure_indexes(p)
    assert await redis.exists(keys.batch_indexes_built(p), keys.batch_finished_indexed(p)) == 2
    fields = dict(await store.fields(p, "b0") or {})
    fields.update({"state": "stop", "outcome": "failed", "reason": "boom", "stop_ts": "1",
                   "rev": str(int(fields["rev"]) + 1)})
    await restore_batches(redis, store, Pager(redis, scripts, b"secret"),
                          [Snapshot(p, "b0", fields)], set(), Restored())

    async def listed(**where: str) -> list[str]:
        return list((await store.page(p, 10, None, ListFilter.parse(**where))).items)

    assert (await listed(state="stop"), await listed(outcome="failed")) == (["b0"], ["b0"])
    assert await redis.zscore(keys.batch_state_index(p, "pending"), "b0") is None
    assert await redis.zcard(keys.batch_finished_index(p)) == 1
