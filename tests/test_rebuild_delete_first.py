"""A DELETE that reaches the commands topic before the POST's own run command, then a rebuild
of Redis, on the real Kafka, Redis and Prefect (an idle work pool).

The POST's batch is visible from its create on (here as the pipeline's latest), so a DELETE
can be answered while the POST's send is still slow. Live, the consumer hides the batch on
the delete and skips the run behind it. The rebuild counted that run as the batch's creation,
after the delete, and brought the batch back live."""

from __future__ import annotations

import asyncio
from typing import Any

from consumers.commands import CommandsConsumer
from consumers.plumbing.scope import serving
from consumers.rebuild import rebuild
from core.command_messages import Command
from core.connections import open_redis
from core.settings import Settings
from service.appkeys import COMMANDS
from tests.conftest import PrivateRedis, eventually
from tests.helpers import AUTH, api_client, api_settings, spec_body
from tests.test_consumers_support import Deployer, committed, flow_runs, options, prefect, unique


async def _deleted_before_its_run_was_sent(api: Any) -> str:
    """A POST whose run command waits until a DELETE of its batch was answered."""
    sender = api.server.app[COMMANDS]
    send = sender.command
    deleted = asyncio.Event()

    async def slow(command: Command) -> None:
        if command.type == "run":
            await deleted.wait()
        await send(command)

    sender.command = slow
    post = asyncio.create_task(api.post("/api/v1/batches/p", headers=AUTH))

    async def latest() -> str | None:
        response = await api.get("/api/v1/batches/p", headers=AUTH)
        return str((await response.json())["id"]) if response.status == 200 else None

    batch_id = str(await eventually(latest, timeout=10, interval=0.05))
    assert (await api.delete(f"/api/v1/batches/p/{batch_id}", headers=AUTH)).status == 200
    deleted.set()
    assert (await post).status == 200
    return batch_id


async def test_a_batch_deleted_before_its_run_command_was_sent_stays_deleted_after_a_rebuild(
        topics: Settings, private_redis: PrivateRedis) -> None:
    topics = topics.model_copy(update={"redis_url": private_redis.url})
    settings = api_settings(topics)
    redis = await open_redis(topics)
    deployer = Deployer(topics)
    batch_id = ""
    try:
        async with api_client(settings) as api:
            response = await api.put("/api/v1/pipelines/p", headers=AUTH,
                                     json=spec_body(name=unique("delete-first")))
            assert response.status == 201
            batch_id = await _deleted_before_its_run_was_sent(api)
        consumer = CommandsConsumer(topics, options(cleanup_recheck_s=600.0),
                                    ensure=deployer.ensure)
        async with serving([consumer], topics, 5.0):
            async def both_taken() -> bool:
                return await committed(topics, topics.group_commands,
                                       topics.topic_commands) >= 2
            await eventually(both_taken, timeout=30)
        async with api_client(settings) as api:
            path = f"/api/v1/batches/p/{batch_id}"
            assert (await api.get(path, headers=AUTH)).status == 404
            await redis.flushdb()
            await rebuild(topics)
            assert (await api.get(path, headers=AUTH)).status == 404
        async with prefect(topics) as client:
            assert await flow_runs(client, batch_id) == []
    finally:
        await deployer.cleanup([batch_id] if batch_id else [])
        await redis.aclose()
