"""RESTORE_HASHES (core.restore) on a real Redis: a rebuild writes each hash back as its
snapshot holds it. Packed and pre-packing snapshots: tests/test_store_packing.py."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from core import keys
from core.paging import Pager
from core.restore import Restored, restore_batches
from core.scripts import Scripts
from core.snapshots import Snapshot
from core.store import BatchStore
from tests.test_store_packing import P, large_running, raw


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
