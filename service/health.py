"""Liveness and readiness, unauthenticated, for load balancers and orchestrators."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from aiohttp import web

from core import keys
from service.appkeys import COMMANDS, REDIS, SETTINGS
from service.batches import json_obj

READY_PROBE_TTL_MS = 10_000


async def healthz(request: web.Request) -> web.Response:
    return json_obj({"status": "ok"})


async def _check(probe: Awaitable[object]) -> bool:
    try:
        async with asyncio.timeout(2):
            await probe
    except Exception:
        return False
    return True


async def readyz(request: web.Request) -> web.Response:
    """Ready when this process can take writes, not merely reach its dependencies: Redis
    takes a write (PING passes on a READONLY replica, under OOM, while LOADING), and the
    command sender can write the commands topic (metadata answers while the topic is gone)
    and does not refuse writes at the moment. `checks.topics` also says, from the same
    metadata, whether each other topic the API writes (the webhook's events, the PUT's
    pipelines) exists with its leaders (null: Kafka known unreachable, nothing probed). Only
    the commands topic decides readiness: the others missing fail every instance alike, and
    taking them all out of rotation would stop the reads and the batches' writes with them."""
    redis_ok = await _check(request.app[REDIS].set(keys.READY_PROBE, "1", px=READY_PROBE_TTL_MS))
    sender = request.app[COMMANDS]
    settings = request.app[SETTINGS]
    topics: dict[str, bool | None]
    if sender.available:
        topics = dict(await sender.probe_topics([settings.topic_events,
                                                 settings.topic_pipelines]))
    else:  # Kafka known unreachable: nothing probed, nothing known
        topics = dict.fromkeys([settings.topic_commands, settings.topic_events,
                                settings.topic_pipelines])
    kafka_ok = bool(topics[settings.topic_commands])
    ready = redis_ok and kafka_ok
    body = {"status": "ready" if ready else "unavailable",
            "checks": {"redis": redis_ok, "kafka": kafka_ok, "topics": topics}}
    return json_obj(body, status=200 if ready else 503)
