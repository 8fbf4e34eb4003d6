"""A POST whose API process died (SIGKILL, OOM) after its batch's create and before Kafka took
its run command, and whose client never retried with the same Idempotency-Key (or sent none):
nothing would ever run or end the batch, which read `pending` for ever. Any API process's
abandoner loop now sends its run command once the create's lease has passed
(`service.abandon`, `keys.unsent_runs`).

The death is simulated in process as in test_post_killed.py: the first send never returns,
as a dead process's would not, so none of the POST's own failure handling runs. That a run
command sent twice runs one flow run is the consumer's own test
(test_consumers_commands.py: test_run_creates_one_flow_run_even_when_delivered_twice)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from consumers.commands import CommandsConsumer
from core import keys, layout
from core.codec import Command, Run, decode_command
from core.command_messages import Recorded
from core.settings import Settings
from service.abandon import Abandoner
from service.appkeys import ABANDONER, COMMANDS
from tests.conftest import eventually
from tests.helpers import AUTH, api_client, api_settings, read_topic, spec_body
from tests.test_consumers_support import Deployer, options, running, unique
from tests.test_post_killed import Dies, batch_ids, registered_api

Client = TestClient[Any, Any]
LEASE_MS = 300


@pytest.fixture
async def api(topics: Settings, redis: Redis) -> AsyncIterator[Client]:
    async with registered_api(topics) as client:  # (redis: a flushed DB)
        abandoner = client.app[ABANDONER]
        abandoner._idle_s = 0.1  # rounds often, so a test need not wait 5 s for one
        abandoner._wake.set()
        yield client


def lease(abandoner: Abandoner, ms: int) -> None:
    abandoner.unsent.lease_s = ms / 1000
    abandoner._next_sweep = 0.0
    abandoner._wake.set()


async def commands_of(settings: Settings, batch_id: str, last: str) -> list[Command]:
    """The batch's commands on the topic, up to its first `last` (one batch's commands share
    a partition, so everything sent before that one is read)."""
    def have(records: list[Any]) -> bool:
        return any(decode_command(r.value).batch_id == batch_id
                   and decode_command(r.value).type == last for r in records)

    records = await read_topic(settings, settings.topic_commands, have)
    commands = [c for c in map(decode_command, (r.value for r in records))
                if c.batch_id == batch_id]
    return commands[:[c.type for c in commands].index(last) + 1]


async def types_of(settings: Settings, batch_id: str, last: str) -> list[str]:
    return [c.type for c in await commands_of(settings, batch_id, last)]


async def test_a_batch_whose_process_died_before_the_send_is_run_after_the_lease(
        api: Client, redis: Redis, topics: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    lease(api.app[ABANDONER], LEASE_MS)
    sender = api.app[COMMANDS]
    dies = Dies(sender.command, after=False)
    monkeypatch.setattr(sender, "command", dies)
    first = asyncio.create_task(api.post("/api/v1/batches/p", headers=AUTH))
    await asyncio.wait_for(dies.reached.wait(), 10)
    [batch_id] = await batch_ids(redis)  # created, pending, no run command behind it
    try:
        # No retry comes: the abandoner loop sends the run command, once.
        assert await types_of(topics, batch_id, "run") == ["run"]

        async def entry_gone() -> bool:
            return await redis.zscore(keys.unsent_runs("p"), batch_id) is None

        assert await eventually(entry_gone, timeout=10)
        response = await api.get(f"/api/v1/batches/p/{batch_id}", headers=AUTH)
        assert response.status == 200
    finally:
        dies.bury()
        await first


async def test_a_batch_whose_send_was_acked_is_not_sent_again(
        api: Client, redis: Redis, topics: Settings) -> None:
    abandoner = api.app[ABANDONER]
    response = await api.post("/api/v1/batches/p", headers=AUTH)
    assert response.status == 200
    batch_id = str((await response.json())["item"])

    async def entry_gone() -> bool:
        return await redis.zscore(keys.unsent_runs("p"), batch_id) is None

    assert await eventually(entry_gone, timeout=10)  # removed by the loop, not swept
    lease(abandoner, 0)
    assert await abandoner.sweep_once() == 0
    # Still pending (no consumer here), so a sweep that found it would have sent it again:
    # the delete, on the batch's partition behind anything the sweeps sent, closes the read.
    assert (await api.delete(f"/api/v1/batches/p/{batch_id}", headers=AUTH)).status == 200
    assert await types_of(topics, batch_id, "delete") == ["run", "delete"]


async def test_a_batch_deleted_before_the_sweep_is_not_sent(
        api: Client, redis: Redis, topics: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    abandoner = api.app[ABANDONER]
    sender = api.app[COMMANDS]
    dies = Dies(sender.command, after=False)
    monkeypatch.setattr(sender, "command", dies)
    first = asyncio.create_task(api.post("/api/v1/batches/p", headers=AUTH))
    await asyncio.wait_for(dies.reached.wait(), 10)
    [batch_id] = await batch_ids(redis)
    try:
        # Read `pending` in the list, so deleted by its client (the lease still runs).
        assert (await api.delete(f"/api/v1/batches/p/{batch_id}", headers=AUTH)).status == 200
        lease(abandoner, 0)
        assert await abandoner.sweep_once() == 0
        assert await redis.zscore(keys.unsent_runs("p"), batch_id) is None
        # A stop of the test's own, behind anything the sweep could have sent.
        await sender.command(Command("stop", batch_id, "p", pipeline_version="1"))
        assert await types_of(topics, batch_id, "stop") == ["delete", "stop"]
    finally:
        dies.bury()
        await first


async def test_a_resume_whose_process_died_before_the_send_is_run_after_the_lease(
        api: Client, redis: Redis, topics: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    response = await api.post("/api/v1/batches/p", headers=AUTH)
    old = str((await response.json())["item"])
    # It failed, as the events consumer records it.
    await redis.hset(keys.batch("p", old), mapping={"state": "stop", "outcome": "failed"})
    lease(api.app[ABANDONER], LEASE_MS)
    sender = api.app[COMMANDS]
    dies = Dies(sender.command, after=False)
    monkeypatch.setattr(sender, "command", dies)
    first = asyncio.create_task(api.post(f"/api/v1/batches/p/{old}/resume", headers=AUTH))
    await asyncio.wait_for(dies.reached.wait(), 10)
    [resumed] = [b for b in await batch_ids(redis) if b != old]
    try:
        [run] = await commands_of(topics, resumed, "run")
        # Sent as the resume would have: what a rebuild restores it from included.
        assert isinstance(run, Run) and isinstance(run.recorded, Recorded)
        assert run.recorded.extra[layout.RESUMED_FROM] == old
    finally:
        dies.bury()
        await first


async def test_the_consumer_takes_the_swept_run_and_the_batch_leaves_pending(
        topics: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    deployer = Deployer(topics)  # runs on a pool no worker polls: they stay Scheduled
    batches: list[str] = []
    try:
        async with api_client(api_settings(topics)) as api:
            body = spec_body(name=unique("pending-sweep"))
            assert (await api.put("/api/v1/pipelines/p", json=body, headers=AUTH)).status == 201
            lease(api.app[ABANDONER], LEASE_MS)
            api.app[ABANDONER]._idle_s = 0.1
            sender = api.app[COMMANDS]
            dies = Dies(sender.command, after=False)
            monkeypatch.setattr(sender, "command", dies)
            first = asyncio.create_task(api.post("/api/v1/batches/p", headers=AUTH))
            await asyncio.wait_for(dies.reached.wait(), 10)
            batches += await batch_ids(redis)
            try:
                consumer = CommandsConsumer(topics, options(), ensure=deployer.ensure)
                async with running(consumer):
                    async def left_pending() -> str | None:
                        response = await api.get(f"/api/v1/batches/p/{batches[0]}",
                                                 headers=AUTH)
                        state = str((await response.json())["state"]["state"])
                        return state if state != "pending" else None

                    assert await eventually(left_pending, timeout=30) == "scheduled"
            finally:
                dies.bury()
                await first
    finally:
        await deployer.cleanup(batches)
