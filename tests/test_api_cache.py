"""The GET cache serves repeated reads and never serves a value a change has replaced."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from core.codec import Event
from core.settings import Settings
from service.appkeys import CACHE, STORE
from tests.cache_support import engines
from tests.conftest import eventually
from tests.helpers import AUTH, api_client, api_settings, spec_body


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    yield from engines("redis", "kafka")


async def _batch_with_live_cache(api: Any) -> str:
    """Once the cache follows its feed: a new batch of pipeline `p`, through the API."""
    await eventually(lambda: api.app[CACHE].live)
    await api.put("/api/v1/pipelines/p", json=spec_body(), headers=AUTH)
    return str((await (await api.post("/api/v1/batches/p", headers=AUTH)).json())["item"])


async def test_reads_are_cached_and_invalidated_by_changes(topics: Settings, redis: Redis) -> None:
    async with api_client(api_settings(topics)) as api:
        cache = api.app[CACHE]
        batch_id = await _batch_with_live_cache(api)
        url = f"/api/v1/batches/p/{batch_id}"
        first = await (await api.get(url, headers=AUTH)).read()

        # A repeated read is a hit. Not necessarily the very next one: the create's change
        # message travels on the feed's own connection and may reach the cache after the
        # first read began, which then refuses that read's fill (it cannot tell it saw the
        # change); a busy CI machine did that once.
        async def hit() -> bool:
            hits = cache.hits
            assert await (await api.get(url, headers=AUTH)).read() == first
            return bool(cache.hits == hits + 1)

        await eventually(hit, timeout=5)

        # A change made elsewhere (the events consumer's path) reaches the cache.
        await api.app[STORE].apply([Event("batch.state", batch_id, "p", state="running")])

        async def shows_running() -> bool:
            body = await (await api.get(url, headers=AUTH)).json()
            return bool(body["state"]["state"] == "running")

        await eventually(shows_running, timeout=5)


async def test_cache_is_off_without_its_feed(topics: Settings, redis: Redis) -> None:
    async with api_client(api_settings(topics)) as api:
        cache = api.app[CACHE]
        batch_id = await _batch_with_live_cache(api)
        key = f"dhub:{{p}}:batch:{batch_id}"

        # Filled by a read, not necessarily the first (the create's change message may reach
        # the cache after that read began, which then refuses its fill: a busy CI run did).
        async def cached() -> bool:
            await (await api.get(f"/api/v1/batches/p/{batch_id}", headers=AUTH)).read()
            return cache.get(key) is not None

        await eventually(cached, timeout=5)
        # Cut the subscription's connection: the cache must drop out until it resubscribes.
        generation = cache.generation
        # Only this test's database's: the stack's API and the other tests running meanwhile
        # (`make test` runs two files at once, each on a database of its own) keep theirs.
        db = str(redis.connection_pool.connection_kwargs.get("db", 0))
        for client in await redis.client_list(_type="pubsub"):
            if client["db"] == db:
                await redis.client_kill_filter(_id=client["id"])
        await eventually(lambda: cache.generation > generation and cache.live, timeout=10)
        assert cache.get(key) is None, "entries survived a lost feed"
