"""POST -> running, next to its floor: the same deployment's flow runs created straight through
Prefect's client, timed create -> Running.

The two alternate, one run at a time (each waited to its end), so both meet the same worker,
server and machine. The floor's runs are announced to the worker as the commands consumer
announces dhub's (`keys.WORKER_NUDGES_CHANNEL`): the stack's worker learns of a run that
way, and polls Prefect only as a safety net (every PREFECT_WORKER_QUERY_SECONDS). For
dhub's runs Prefect's own Running timestamp is read too, which splits dhub's time into
"before Prefect had the run" and "after".
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import StateType
from redis.asyncio import Redis

from core import keys
from core.connections import open_redis
from core.models import deployment_name
from core.settings import Settings

PIPELINE = "bench-e2e"
FINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED}
POLL_S = 0.01
DEADLINE_S = 120.0


@dataclass
class Starts:
    dhub: dict[str, list[float]] = field(
        default_factory=lambda: {"scheduled": [], "running": [], "stop": []})
    floor: list[float] = field(default_factory=list)  # create -> Running, Prefect's client
    # dhub: POST -> Prefect's Running timestamp of the batch's flow run (Prefect's clock).
    dhub_prefect_running: list[float] = field(default_factory=list)


async def _get(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url) as response:
        response.raise_for_status()
        body: dict[str, Any] = await response.json()
        return body


async def _running_at(client: PrefectClient, flow_run_id: str) -> datetime | None:
    for state in await client.read_flow_run_states(uuid.UUID(flow_run_id)):
        if state.type == StateType.RUNNING and state.timestamp is not None:
            return state.timestamp
    return None


async def dhub_run(api: str, session: aiohttp.ClientSession, client: PrefectClient,
                   out: Starts) -> None:
    order = ["pending", "scheduled", "running", "stop"]
    posted_at = datetime.now().astimezone()
    t0 = time.perf_counter()
    async with session.post(f"{api}/api/v1/batches/{PIPELINE}") as response:
        response.raise_for_status()
        batch_id = (await response.json())["item"]
    url = f"{api}/api/v1/batches/{PIPELINE}/{batch_id}"
    seen: dict[str, float] = {}
    body: dict[str, Any] = {}
    while "stop" not in seen and time.perf_counter() < t0 + DEADLINE_S:
        body = await _get(session, url)
        now = time.perf_counter() - t0
        for name in order[1:order.index(body["state"]["state"]) + 1]:
            seen.setdefault(name, now)
        await asyncio.sleep(POLL_S)
    for name, values in out.dhub.items():
        if name in seen:
            values.append(seen[name])
    if body.get("flow_run_id"):
        running = await _running_at(client, body["flow_run_id"])
        if running is not None:
            out.dhub_prefect_running.append((running - posted_at).total_seconds())


async def floor_run(client: PrefectClient, redis: Redis, pool: str, deployment_id: uuid.UUID,
                    version: str, out: Starts) -> None:
    """A flow run of the same deployment created straight through Prefect, and the worker
    told of it. Its batch id is one no batch has, so the events it publishes are dropped and
    nothing in dhub changes."""
    t0 = time.perf_counter()
    run = await client.create_flow_run_from_deployment(
        deployment_id, parameters={"batch_id": f"floor-{uuid.uuid4().hex}",
                                   "pipeline_id": PIPELINE, "pipeline_version": version})
    await redis.publish(keys.WORKER_NUDGES_CHANNEL, pool)
    running = None
    while time.perf_counter() < t0 + DEADLINE_S:
        state = (await client.read_flow_run(run.id)).state
        kind = state.type if state else None
        if running is None and kind in (StateType.RUNNING, *FINAL):
            running = time.perf_counter() - t0
        if kind in FINAL:
            break
        await asyncio.sleep(POLL_S)
    if running is not None:
        out.floor.append(running)


async def start_latency(api: str, session: aiohttp.ClientSession, settings: Settings,
                        batches: int) -> Starts:
    spec = {"name": PIPELINE, "version": "1",
            "steps": [{"name": s, "uses": f"sales.{s}", "config": {"rows": 400, "partitions": 2}}
                      for s in ("extract", "transform", "load")]}
    async with session.put(f"{api}/api/v1/pipelines/{PIPELINE}", json=spec) as response:
        response.raise_for_status()
    out = Starts()
    redis = await open_redis(settings)
    try:
        async with PrefectClient(settings.prefect_api_url) as client:
            # The first dhub run deploys the pipeline (its deploy command), warms the worker.
            await dhub_run(api, session, client, Starts())
            deployment = await client.read_deployment_by_name(deployment_name(PIPELINE))
            for _ in range(batches):
                await dhub_run(api, session, client, out)
                await floor_run(client, redis, settings.work_pool, deployment.id,
                                spec["version"], out)  # type: ignore[arg-type]
    finally:
        await redis.aclose()
    return out
