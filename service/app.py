"""The application factory: one `cleanup_ctx` per client, typed app keys, routes behind the edge."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from core import keys
from core.api_scripts import ApiScripts
from core.connections import open_producer, open_redis
from core.registry import PipelineRegistry
from core.scripts import Scripts
from core.settings import Settings, get_settings
from core.store import BatchStore
from service.abandon import Abandoner
from service.appkeys import (
    ABANDONER,
    API_SCRIPTS,
    CACHE,
    COMMANDS,
    IDEMPOTENCY,
    METRICS_REGISTRY,
    PRODUCER,
    REDIS,
    REGISTRY,
    REQUEST_STATS,
    SETTINGS,
    STORE,
    WAITERS,
)
from service.auth import Authenticator
from service.cache import BatchCache
from service.command_sender import CommandSender
from service.idempotency import IdempotencyKeys
from service.metrics import RequestStats, registry_for
from service.pipeline_routes import settle_late_records
from service.routes import setup_routes
from service.waiters import ChangeWaiters


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    redis = await open_redis(settings)
    scripts = Scripts(redis)
    app[REDIS] = redis
    app[REGISTRY] = PipelineRegistry(redis, scripts)
    app[STORE] = BatchStore.from_settings(redis, settings, scripts)
    app[API_SCRIPTS] = ApiScripts(redis)
    app[IDEMPOTENCY] = IdempotencyKeys(redis, app[API_SCRIPTS], ttl_s=settings.idempotency_ttl_s)
    yield
    await app[IDEMPOTENCY].close()
    await redis.aclose()


# At shutdown, how long what this process alone still holds (undos, late pipeline records)
# may take before it is given up and logged.
SHUTDOWN_WORK_S = 10.0


async def kafka_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    producer = await open_producer(settings)
    app[PRODUCER] = producer
    sender = CommandSender(producer, settings.topic_commands, settings.topic_events)
    app[COMMANDS] = sender
    abandoner = Abandoner(app[REDIS], app[API_SCRIPTS], sender, purge=app[STORE].purge)
    app[ABANDONER] = abandoner
    # Queues the deletes of batches abandoned after an ambiguous send (this process's or
    # another's that stopped before it could).
    drainer = asyncio.create_task(abandoner.run())
    yield
    drainer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await drainer
    # Redis is still open (redis_ctx ends after this): what this process alone holds is
    # tried once more before it is given up.
    await abandoner.finish(SHUTDOWN_WORK_S)
    await settle_late_records(producer, SHUTDOWN_WORK_S)
    await sender.close()
    await producer.stop()


async def cache_ctx(app: web.Application) -> AsyncIterator[None]:
    cache = app[CACHE]
    cache.on_change = app[WAITERS].changed
    follower = asyncio.create_task(cache.follow(app[REDIS], keys.CHANGES_CHANNEL))
    yield
    follower.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await follower


async def close_waiters(app: web.Application) -> None:
    """Shutdown: held GETs answer and streams end now, not at their next keep-alive."""
    app[WAITERS].close()


def init_app(settings: Settings | None = None) -> web.Application:
    settings = settings or get_settings()
    authenticator = Authenticator.from_settings(settings)
    requests = RequestStats()
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[REQUEST_STATS] = requests  # the edge's, and those the HTTP parser refuses
    app[CACHE] = BatchCache(settings.cache_max_entries, silence_s=settings.cache_silence_s,
                            ttl_s=settings.cache_ttl_s)
    # Long-poll GETs wait on the cache's change feed (a test may swap the cache: see
    # cache_ctx, which wires whichever cache the app holds when it starts).
    app[WAITERS] = ChangeWaiters()
    app[METRICS_REGISTRY] = registry_for(requests, app)
    app.on_shutdown.append(close_waiters)
    app.cleanup_ctx.append(redis_ctx)
    app.cleanup_ctx.append(kafka_ctx)
    if settings.api_cache:
        app.cleanup_ctx.append(cache_ctx)
    setup_routes(app, authenticator, requests.observe)
    return app
