"""A retention round cut short after its tombstone (the events process killed), then a resume
noted before the next round: the next round keeps the batch, and writes its snapshot again,
so the cut round's tombstone is not its last record (a rebuild lost it)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from redis.asyncio import Redis

from consumers.rebuild_read import read_snapshots
from consumers.retention import RetentionSweeper
from core import keys
from core.layout import RESUMED_FROM
from core.models import new_batch_id
from core.scripts import Scripts
from core.settings import Settings
from core.snapshots import SnapshotWriter
from core.store import BatchStore
from tests.helpers import spec
from tests.test_retention import NOW, P, batch


class Killed(Exception):
    """The events process died here (SIGKILL): nothing after this line of the round ran."""


async def test_a_batch_kept_by_the_round_after_a_cut_one_is_not_left_tombstoned(
        topics: Settings, redis: Redis, scripts: Scripts) -> None:
    retention = topics.model_copy(update={"batch_retention_days": 30})
    store = BatchStore.from_settings(redis, retention, scripts)
    await redis.sadd(keys.PIPELINES, P)
    a = await batch(store, stopped_at=NOW - timedelta(days=40))  # failed half way, say
    # Its snapshot is on the topic (the events consumer's flush of its stop).
    part = RetentionSweeper(retention, clock=NOW.timestamp)
    await part.start()
    try:
        await part.snapshots.write_current([(P, a)])
        real = part.snapshots.tombstone

        async def tombstone_then_die(p: str, b: str) -> None:
            await real(p, b)
            raise Killed

        part.snapshots.tombstone = tombstone_then_die  # type: ignore[method-assign,assignment]
        with pytest.raises(Killed):
            await part.sweep_once()
    finally:
        await part.stop()
    assert await store.get(P, a) is not None  # not purged: the round died first
    # Before the restarted process's first round: a resume C of A (it goes on from A's data)
    # is accepted, and has not started a step yet.
    c = new_batch_id()
    await store.note_resume(P, a, c)
    assert await store.resume_may_go_on(P, a, c)
    await store.create(P, c, spec(), extra={RESUMED_FROM: a})
    part = RetentionSweeper(retention, clock=NOW.timestamp)
    await part.start()
    try:
        assert await part.sweep_once() == 0  # A is kept: its resume goes on from its data
        # A marker after the round's records: the topic holds everything written before it.
        await SnapshotWriter(part.snapshots.producer, redis,
                             retention.topic_snapshots).write_current([(P, c)])
    finally:
        await part.stop()
    assert await store.get(P, a) is not None
    restored = {s.batch_id for s in await read_snapshots(retention) if s.pipeline_id == P}
    assert c in restored
    assert a in restored, (
        "A is kept (GET 200, its resume goes on from its data) but its last snapshot record "
        "is the cut round's tombstone: a rebuild loses it")
