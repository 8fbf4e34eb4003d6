"""A rebuild restores the resumed-by sets the retention reads: a stopped resume that never ran
a step goes on from its holder's data if resumed in turn, so the holder is kept for it, after
a loss of Redis as before it (the rebuild noted only resumes not `stop`)."""

from __future__ import annotations

import contextlib
from datetime import timedelta
from pathlib import Path

from redis.asyncio import Redis

from consumers.plumbing.part import open_clients
from consumers.rebuild import rebuild
from core import keys
from core.settings import Settings
from core.snapshots import SnapshotWriter
from tests.helpers import AUTH, api_client, api_settings, swept_at
from tests.test_lifecycle_truth import stopped_resume
from tests.test_resume_truth import P as RP
from tests.test_resume_truth import post


async def test_a_kept_resumes_holder_survives_a_rebuild_as_it_did_before(
        topics: Settings, redis: Redis, tmp_path: Path) -> None:
    retention = topics.model_copy(update={"batch_retention_days": 30})
    async with api_client(api_settings(retention)) as api:
        a, b, later = await stopped_resume(api, redis, tmp_path, retention)
        # The events consumer's flush: both batches' snapshots as Redis holds them.
        async with contextlib.AsyncExitStack() as scope:
            clients = await open_clients(scope, retention)
            writer = SnapshotWriter(clients.producer, redis, retention.topic_snapshots)
            assert await writer.write_current([(RP, a), (RP, b)]) == 2
        before = await redis.smembers(keys.resumed_by(RP, a))
        assert before == {b}
        # Redis lost, rebuilt from Kafka.
        await redis.flushdb()
        await rebuild(retention)
        shown = await (await api.get(f"/api/v1/batches/{RP}/{b}", headers=AUTH)).json()
        assert shown["state"]["state"] == "stop" and shown["resumed_from"] == a, shown
        # As before the loss (tests/test_lifecycle_truth.py's twin): A is kept for B, and
        # a resume of B goes on from A's data.
        removed = await swept_at(retention, (later + timedelta(days=2)).timestamp)
        status_a = (await api.get(f"/api/v1/batches/{RP}/{a}", headers=AUTH)).status
        status, body = await post(api, f"/api/v1/batches/{RP}/{b}/resume")
        assert (removed, status_a, status) == (0, 200, 200), (body, await redis.smembers(
            keys.resumed_by(RP, a)))
