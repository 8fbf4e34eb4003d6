"""A resume of a resume that never ran a step goes on from its holder's data only while the
holder is the batch it was made from. Was: the holder was any visible batch of the holder's
id, so once a deleted holder's published id was run again, the resume answered 200 over a
new, empty batch X (its first step shown `success`, offsets carried from data deleted long
ago) and noted itself in the new X's resumed-by set. Now a holder created after the batch
resumed is another batch: the resume answers the same 409 as for a holder deleted, and
nothing is written."""

from __future__ import annotations

from pathlib import Path

from redis.asyncio import Redis

from core import keys
from core.models import PipelineSpec
from core.scripts import Scripts
from core.store import BatchStore
from tests.helpers import AUTH
from tests.test_resume_truth import GO_ON, SPEC, Client, P, api, apply, ev, post  # noqa: F401  (api: the fixture)


async def test_a_resume_does_not_go_on_from_a_later_batch_of_its_deleted_holders_id(
        api: Client, redis: Redis, tmp_path: Path) -> None:  # noqa: F811
    store = BatchStore(redis, Scripts(redis), token_secret=b"t")
    spec = PipelineSpec.model_validate(SPEC)
    x = "order-2026-11-01"  # an upstream service's published id
    await store.create(P, x, spec)
    await apply(redis, x, ev("batch.state", state="running"),
                ev("step.state", step="extract", state="running"),
                ev("step.offsets", step="extract", offsets={"partition_0": 400,
                                                            "partition_1": 400},
                   totals={"partition_0": 400, "partition_1": 400}),
                ev("step.state", step="extract", state="success"),
                ev("step.state", step="transform", state="running"),
                ev("step.offsets", step="transform", offsets={"partition_0": 100}),
                ev("step.state", step="transform", state="failed"),
                ev("batch.state", state="stop", outcome="failed", reason="on purpose"))
    status, body = await post(api, f"/api/v1/batches/{P}/{x}/resume", json=GO_ON)
    assert status == 200, body
    b = body["item"]
    await apply(redis, b, ev("batch.state", state="stop", outcome="cancelled",
                             reason="stopped before it started"))
    # X is deleted (B no longer live): its data removed, then purged by the clean-up.
    assert (await api.delete(f"/api/v1/batches/{P}/{x}", headers=AUTH)).status == 200
    await store.purge(P, x)
    status, body = await post(api, f"/api/v1/batches/{P}/{b}/resume")
    assert status == 409, body  # nothing to go on from
    # Its claim expired (30 days after the delete), the publisher runs id X again: a new
    # batch, pending, which has made no data at all.
    await redis.delete(keys.deletes(P, x))  # the DELETE's 30 s mark, long expired
    await store.create(P, x, spec)
    listed = await redis.zcard(keys.batch_index(P))
    status, body = await post(api, f"/api/v1/batches/{P}/{b}/resume")
    assert status == 409, body
    assert body["error"]["details"] == {"resumed_from": x}
    assert "deleted since" in body["error"]["message"]
    assert await redis.zcard(keys.batch_index(P)) == listed  # nothing created
    assert not await redis.smembers(keys.resumed_by(P, x))  # the new X's delete is free
