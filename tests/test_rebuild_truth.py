"""Untrue answers after a rebuild (`consumers.rebuild`, `core.restore`): what a rebuilt Redis
answers must be what the API answered before the loss, whatever the topics and the database
written into hold."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from core.paging import Pager
from core.restore import Restored, restore_batches
from core.scripts import Scripts
from core.snapshots import Snapshot
from core.store import BatchStore
from tests.helpers import spec
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
