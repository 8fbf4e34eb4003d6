"""The abandoner's outbox (`service.abandon`), on a real Redis: which queued deletes say
`abandoned` (the request that made the batch released its Idempotency-Key: a rebuild must not
restore the key's record), including entries written before that was recorded."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, cast

import orjson
import pytest
from redis.asyncio import Redis

from core import keys
from core.api_scripts import ApiScripts
from core.codec import Command, Delete
from service.abandon import Abandoner
from service.command_sender import CommandSender


class _Sent:
    """Stands in for the command sender: what would go to Kafka."""

    def __init__(self) -> None:
        self.commands: list[Command] = []
        self.available = True

    async def command(self, command: Command) -> None:
        self.commands.append(command)


async def test_only_a_delete_after_a_released_key_is_marked_abandoned(redis: Redis) -> None:
    sent = _Sent()
    abandoner = Abandoner(redis, ApiScripts(redis), cast(CommandSender, sent))
    await abandoner.abandon("p", "batch-post", "1", "run unconfirmed", released=True)
    await abandoner.abandon("p", "batch-delete", "1", "deleted", released=False)
    # Written by an API process from before `released` was kept: all its entries were POSTs'
    # or DELETEs' alike, and all were marked; they still are.
    old = orjson.dumps(["p", "batch-old", "1"]).decode()
    await redis.zadd(keys.ABANDONED, {old: time.time()})

    assert await abandoner.drain_once() == 3
    assert all(isinstance(c, Delete) for c in sent.commands)
    marked: dict[str, Any] = {c.batch_id: c.abandoned for c in sent.commands
                              if isinstance(c, Delete)}
    assert sorted(marked) == ["batch-delete", "batch-old", "batch-post"]
    assert (marked["batch-post"], marked["batch-old"]) == (True, True)
    assert marked["batch-delete"] is not True
    assert await redis.zcard(keys.ABANDONED) == 0


async def test_a_cancel_swallowed_inside_a_round_still_ends_the_loop(redis: Redis) -> None:
    # The API's shutdown cancels the loop and awaits it: a cancel swallowed on the way (by a
    # client library mid-call) left the loop running, and the shutdown waiting, for ever.
    in_purge = asyncio.Event()
    calls = 0

    async def purge(pipeline_id: str, batch_id: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("Redis away")  # the undo is left for the loop
        in_purge.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()

    abandoner = Abandoner(redis, ApiScripts(redis), cast(CommandSender, _Sent()), purge=purge,
                          idle_s=0.05)
    await abandoner.undo("p", "batch-1")
    task = asyncio.create_task(abandoner.run())
    await asyncio.wait_for(in_purge.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)
