"""A failed POST's undo or abandon holds its Idempotency-Key until it is done. A first version
of the take-over guard released the key before the abandon's hide (or the undo's purge): a
process dying between the two left the batch (its run command on the topic, or its unsent
entry for the sweep) with its key free, and the client's retry claimed afresh and ran a
second batch beside it. Now the guard renews the attempt's lease, and the key is released
after; a death in between leaves the record pending, and the retry takes it over and
finishes the first batch."""

from __future__ import annotations

from typing import Any, cast

from redis.asyncio import Redis

from core import keys
from core.settings import Settings
from service.appkeys import ABANDONER, COMMANDS
from service.command_sender import Ambiguous, Refused
from tests.test_post_killed import (  # noqa: F401  (api: the fixture)
    Client,
    Dies,
    api,
    batch_ids,
    first_dies,
    retried,
    run_commands,
)


async def test_an_abandon_cut_short_leaves_the_key_to_its_batch(
        api: Client, redis: Redis, topics: Settings, monkeypatch: Any) -> None:  # noqa: F811
    sender = api.app[COMMANDS]
    real = sender.command
    calls = {"n": 0}

    async def ack_lost(command: Any) -> None:
        calls["n"] += 1
        await real(command)
        if calls["n"] == 1:  # Kafka wrote the run command; its ack was lost
            raise Ambiguous("ack lost")

    monkeypatch.setattr(sender, "command", ack_lost)
    abandoner = api.app[ABANDONER]
    dies = Dies(abandoner._hide, after=False)  # the process dies as it starts the hide
    monkeypatch.setattr(abandoner, "_hide", dies)
    first = await first_dies(api, dies)
    [first_id] = await batch_ids(redis)
    assert first_id in await run_commands(topics, first_id)  # its run command is on the topic
    try:
        again = await retried(api)
        fields = cast(dict[str, str], await redis.hgetall(keys.batch("p", first_id)))
        assert (again, await batch_ids(redis)) == (first_id, [first_id]), (
            f"retry got {again}; batches {await batch_ids(redis)}; first batch "
            f"state={fields.get('state')} deleted={fields.get('deleted')}; "
            f"run commands {sorted(await run_commands(topics, again))}")
    finally:
        dies.bury()
        await first


async def test_an_undo_cut_short_leaves_the_key_to_its_batch(
        api: Client, redis: Redis, topics: Settings, monkeypatch: Any) -> None:  # noqa: F811
    sender = api.app[COMMANDS]
    real = sender.command
    calls = {"n": 0}

    async def refused_once(command: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise Refused()
        await real(command)

    monkeypatch.setattr(sender, "command", refused_once)
    abandoner = api.app[ABANDONER]
    dies = Dies(abandoner._purge, after=False)  # dies after the key's check, before the purge
    monkeypatch.setattr(abandoner, "_purge", dies)

    async def dead() -> None:  # the dead process's loop does nothing more
        return None

    monkeypatch.setattr(abandoner, "_undo_pending", dead)
    first = await first_dies(api, dies)
    [first_id] = await batch_ids(redis)
    try:
        again = await retried(api)
        abandoner.unsent.lease_s = 0.0  # the create's lease passed: any process's sweep
        await abandoner.unsent.sweep_once()
        fields = cast(dict[str, str], await redis.hgetall(keys.batch("p", first_id)))
        runs = await run_commands(topics, first_id)
        assert (again, await batch_ids(redis)) == (first_id, [first_id]), (
            f"retry got {again}; batches {await batch_ids(redis)}; first batch "
            f"state={fields.get('state')} deleted={fields.get('deleted')}; "
            f"first's run on topic={first_id in runs}, retry's={again in runs}")
    finally:
        dies.bury()
        await first
