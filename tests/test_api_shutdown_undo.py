"""A POST answered 503 whose batch later ran, through a graceful shutdown (fixed: the
abandoner's `finish` tries once more before it gives up).

Sequence: POST; the create runs; Kafka refuses the run command (`Refused`: certainly not
written) so the batch is to be purged (`Abandoner.undo`); Redis blips at that moment, so the
purge waits in this process's memory (`_undone`) for the abandoner loop's next round (backoff
up to 2 s). Redis answers again; SIGTERM arrives before that round. kafka_ctx's cleanup
cancelled the loop and only *logged* what was left (`left_at_shutdown`), though Redis is still
open (redis_ctx closes after) and the purge would go through now. The batch stayed `pending`
and visible with its unsent-runs entry, so any API process's sweep, once the lease passes,
sent its run command: the batch the client was told 503 ("retry later") ran, and the
client's retry ran a second one."""

from __future__ import annotations

from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from core import keys
from core.settings import Settings
from service.abandon import KeyHolder
from service.appkeys import ABANDONER, COMMANDS
from service.command_sender import Refused
from tests.helpers import AUTH, api_client, api_settings, spec_body


async def test_a_failed_creates_undo_is_not_dropped_at_shutdown(
        topics: Settings, redis: Redis) -> None:
    settings = api_settings(topics)
    async with api_client(settings) as a:
        resp = await a.put("/api/v1/pipelines/p", json=spec_body(version="1"), headers=AUTH)
        assert resp.status == 201
        abandoner = a.app[ABANDONER]
        away = {"redis": True}
        real_purged = abandoner._purged

        async def purged(pipeline_id: str, batch_id: str, holder: KeyHolder | None) -> None:
            if away["redis"]:
                raise redis_errors.ConnectionError("Redis away (blip)")
            await real_purged(pipeline_id, batch_id, holder)

        async def refused(command: Any) -> None:
            raise Refused()

        abandoner._purged = purged
        a.app[COMMANDS].command = refused
        resp = await a.post("/api/v1/batches/p", headers=AUTH)
        assert resp.status == 503, await resp.text()
        assert abandoner.undoing() == 1
        batch_id = next(iter(abandoner._undone))[1]
        away["redis"] = False  # Redis answers again; SIGTERM now (leaving = runner.cleanup)

    fields = await redis.hgetall(keys.batch("p", batch_id))
    # Another API process (or this one restarted) sweeps once the lease has passed.
    async with api_client(settings) as b:
        sweeper = b.app[ABANDONER]
        sweeper.unsent.lease_s = 0.0
        resent = await sweeper.sweep_once()
    assert not fields or fields.get("state") != "pending", (
        f"batch {batch_id}, answered 503, left pending after shutdown: {fields}")
    assert resent == 0, f"the run command of {batch_id}, answered 503, was sent by a sweep"
