"""What a `dhub` watch says must hold when it says it: a long-polled watch ends with the outcome
the batch settled on, not the first `stop` it saw (found by the edge review)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from core.codec import Event
from core.settings import Settings
from dhub.aio import AsyncDhubClient
from tests.cache_support import PIPELINE, cached_api, direct_store, engines, new_batches
from tests.helpers import STATIC_TOKEN


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    yield from engines("redis")


async def test_a_long_polled_watch_ends_with_the_settled_outcome(
        test_settings: Settings, redis: Redis) -> None:
    """`dhub watch --no-stream` (or any watch of a server without streams) ended on the
    first `stop` version it saw. A stopped batch's outcome can still be settled by a later
    stop event (a run Prefect completed after a cancel), which is why the push stream sends
    `end` only after END_QUIET_S (2 s) of quiet: the long-poll watch exited 2 (cancelled)
    while GET said completed (0)."""
    store = direct_store(redis, test_settings)
    [batch_id] = await new_batches(store)
    now = time.time()
    async with cached_api(test_settings) as api:
        async with AsyncDhubClient(str(api.make_url("")).rstrip("/"), STATIC_TOKEN) as client:
            watch = client.watch(PIPELINE, batch_id, stream=False).__aiter__()
            first = await anext(watch)
            assert first.kind == "batch"
            await store.apply([Event("batch.state", batch_id, PIPELINE, state="stop",
                                     outcome="cancelled", reason="stopped", ts=now)])
            stopped = await anext(watch)
            assert stopped.batch is not None and stopped.batch.get("outcome") == "cancelled"
            await store.apply([Event("batch.state", batch_id, PIPELINE, state="stop",
                                     outcome="completed", ts=now + 1)])
            rest: list[Any] = [event async for event in watch]
        response = await api.get(f"/api/v1/batches/{PIPELINE}/{batch_id}",
                                 headers={"Authorization": f"Bearer {STATIC_TOKEN}"})
        assert (await response.json())["outcome"] == "completed"
    assert rest[-1].kind == "end"
    assert rest[-1].batch["outcome"] == "completed"

