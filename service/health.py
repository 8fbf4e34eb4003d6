"""Liveness and readiness, unauthenticated, for load balancers and orchestrators."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from aiohttp import web

from service.appkeys import PRODUCER, REDIS
from service.batches import json_obj


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
    redis_ok = await _check(request.app[REDIS].ping())
    kafka_ok = await _check(request.app[PRODUCER].client.fetch_all_metadata())
    ready = redis_ok and kafka_ok
    body = {"status": "ready" if ready else "unavailable",
            "checks": {"redis": redis_ok, "kafka": kafka_ok}}
    return json_obj(body, status=200 if ready else 503)
