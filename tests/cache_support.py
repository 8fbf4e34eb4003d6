"""Shared setup of the GET-cache tests: an API whose Redis traffic goes through a TcpProxy,
batches created straight in Redis, and reads of what GET answers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from core.codec import Event
from core.models import new_batch_id
from core.settings import Settings, get_settings
from core.store import BatchStore
from service.app import init_app
from service.appkeys import CACHE
from service.cache import BatchCache
from tests.conftest import _parts_up, eventually
from tests.helpers import AUTH, api_settings, spec
from tests.tcp_proxy import TcpProxy

PIPELINE = "p"


def engines(*parts: str) -> Iterator[Settings]:
    """For a module's own `stack` fixture: only the engines its tests use. The suite's fixture
    also checks the worker through `stack.py status`, which can report it missing while another
    stack.py holds the lock; it then stops the shared worker at the end of the session."""
    settings = get_settings()
    with _parts_up(parts, settings):
        yield settings


@asynccontextmanager
async def proxied(settings: Settings) -> AsyncIterator[tuple[TcpProxy, Settings]]:
    """A proxy in front of the test's Redis, and settings whose redis_url goes through it."""
    url = urlsplit(settings.redis_url)
    async with TcpProxy(url.hostname or "127.0.0.1", url.port or 6379) as proxy:
        yield proxy, settings.model_copy(update={"redis_url": proxy.url("redis", url.path)})


@asynccontextmanager
async def cached_api(settings: Settings,
                     cache: BatchCache | None = None) -> AsyncIterator[TestClient[Any, Any]]:
    """The API in-process (optionally with a cache built by the test), once its cache is live."""
    app = init_app(api_settings(settings))
    if cache is not None:
        app[CACHE] = cache
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    try:
        await eventually(lambda: app[CACHE].live, timeout=10)
        yield client
    finally:
        await client.close()


def direct_store(redis: Redis, settings: Settings) -> BatchStore:
    """The store on a client that does not go through any proxy (the consumers' path)."""
    return BatchStore.from_settings(redis, settings)


async def new_batches(store: BatchStore, n: int = 1) -> list[str]:
    ids = [new_batch_id() for _ in range(n)]
    for batch_id in ids:
        await store.create(PIPELINE, batch_id, spec())
    return ids


async def get(api: TestClient[Any, Any], batch_id: str) -> tuple[int, dict[str, Any]]:
    response = await api.get(f"/api/v1/batches/{PIPELINE}/{batch_id}", headers=AUTH)
    return response.status, await response.json()


async def set_offset(store: BatchStore, batch_id: str, offset: int) -> None:
    """A real change of the batch (through the events path), publishing its new hash."""
    await store.apply([Event("step.offsets", batch_id, PIPELINE, step="extract",
                             offsets={"0": offset})])


def cache_of(api: TestClient[Any, Any]) -> BatchCache:
    cache: BatchCache = api.app[CACHE]
    return cache
