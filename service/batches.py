"""The six batch endpoints of the contract. Reads come from Redis (through the cache);
changes are recorded in Redis and queued as commands on Kafka."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
from aiohttp import web

from core import keys
from core.codec import Command
from core.models import PipelineSpec, new_batch_id, valid_id
from core.store import BadToken
from service import auth
from service.appkeys import CACHE, COMMANDS, REDIS, REGISTRY, SETTINGS, STORE
from service.errors import ApiError, bad_request, not_found

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100


def json_bytes(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


def json_obj(data: Any, status: int = 200) -> web.Response:
    return json_bytes(orjson.dumps(data), status)


def path_id(request: web.Request, name: str) -> str:
    value = request.match_info[name]
    if not valid_id(value):
        raise bad_request(f"{name} must match [A-Za-z0-9._-]{{1,128}}")
    return value


async def _resolve(request: web.Request, pipeline_id: str, version: str | None) -> PipelineSpec:
    if version is not None and not valid_id(version):
        raise bad_request("pipeline_version must match [A-Za-z0-9._-]{1,128}")
    spec = await request.app[REGISTRY].get(pipeline_id, version)
    if spec is None:
        if version is None or await request.app[REGISTRY].latest_version(pipeline_id) is None:
            raise not_found(f"unknown pipeline {pipeline_id}")
        raise not_found(f"unknown version {version} of pipeline {pipeline_id}")
    return spec


def _idempotency_record(key: str) -> str:
    if not 1 <= len(key) <= 256:
        raise bad_request("Idempotency-Key must be 1 to 256 characters")
    return keys.idempotency(hashlib.sha256(key.encode()).hexdigest())


async def _claim_idempotency_key(request: web.Request, record_key: str, pipeline_id: str,
                                 version: str, batch_id: str) -> str | None:
    """Records key -> batch for 24 h. Returns the earlier batch id when the key was used
    before for the same pipeline and version; 409 when it was used for another."""
    redis = request.app[REDIS]
    record = orjson.dumps({"p": pipeline_id, "v": version, "b": batch_id})
    ttl = request.app[SETTINGS].idempotency_ttl_s
    if await redis.set(record_key, record, nx=True, ex=ttl):
        return None
    existing = await redis.get(record_key)
    if existing is None:  # expired between the two calls: claim it again
        await redis.set(record_key, record, ex=ttl)
        return None
    earlier = orjson.loads(existing)
    if earlier["p"] != pipeline_id or earlier["v"] != version:
        raise ApiError(409, "conflict",
                       "Idempotency-Key was already used for another pipeline or version")
    return str(earlier["b"])


async def run_batch(request: web.Request) -> web.Response:
    auth.require(request, auth.WRITE)
    pipeline_id = path_id(request, "pipeline_id")
    spec = await _resolve(request, pipeline_id, request.query.get("pipeline_version"))
    batch_id = new_batch_id()
    idem_key = request.headers.get("Idempotency-Key")
    idem_record: str | None = None
    if idem_key is not None:
        idem_record = _idempotency_record(idem_key)
        earlier = await _claim_idempotency_key(request, idem_record, pipeline_id, spec.version,
                                               batch_id)
        if earlier is not None:
            return json_obj({"item": earlier})
    store = request.app[STORE]
    await store.create(pipeline_id, batch_id, spec)
    try:
        await request.app[COMMANDS].command(
            Command("run", batch_id, pipeline_id, pipeline_version=spec.version)
        )
    except BaseException:
        # Kafka did not take the run command: leave nothing behind.
        await store.purge(pipeline_id, batch_id)
        if idem_record is not None:
            await request.app[REDIS].delete(idem_record)
        raise
    return json_obj({"item": batch_id})


async def _read_batch(request: web.Request, key: str) -> bytes:
    """The batch from Redis, rendered, and kept in the cache unless it changed meanwhile."""
    pipeline_id = path_id(request, "pipeline_id")
    batch_id = path_id(request, "batch_id")
    cache = request.app[CACHE]
    generation = cache.generation
    batch = await request.app[STORE].get(pipeline_id, batch_id)
    if batch is None:
        raise not_found(f"unknown batch {batch_id} of pipeline {pipeline_id}")
    body = orjson.dumps(batch)
    cache.put(key, body, generation)
    return body


async def get_batch(request: web.Request) -> web.Response:
    auth.require(request, auth.READ)
    match = request.match_info
    key = keys.batch(match["pipeline_id"], match["batch_id"])
    # The hot path: only ids that passed validation were ever cached, so a hit needs no check.
    body = request.app[CACHE].get(key)
    if body is None:
        body = await _read_batch(request, key)
    return json_bytes(body)


async def latest_batch(request: web.Request) -> web.Response:
    auth.require(request, auth.READ)
    pipeline_id = path_id(request, "pipeline_id")
    batch = await request.app[STORE].latest(pipeline_id)
    if batch is None:
        raise not_found(f"pipeline {pipeline_id} has no batch")
    return json_obj(batch)


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise bad_request(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)


async def list_batches(request: web.Request) -> web.Response:
    auth.require(request, auth.READ)
    pipeline_id = path_id(request, "pipeline_id")
    limit = _limit(request)
    token = request.query.get("token") or None
    try:
        page = await request.app[STORE].page(pipeline_id, limit, token)
    except BadToken as exc:
        raise bad_request(f"invalid token: {exc}") from None
    return json_obj({"items": page.items, "token": page.token})


async def stop_batch(request: web.Request) -> web.Response:
    auth.require(request, auth.WRITE)
    pipeline_id = path_id(request, "pipeline_id")
    batch_id = path_id(request, "batch_id")
    fields = await request.app[STORE].fields(pipeline_id, batch_id)
    if fields is None or "deleted" in fields:
        raise not_found(f"unknown batch {batch_id} of pipeline {pipeline_id}")
    # Stopping a stopped batch answers 200 again without queueing anything new.
    if fields["state"] != "stop":
        await request.app[COMMANDS].command(
            Command("stop", batch_id, pipeline_id, pipeline_version=fields["pipeline_version"])
        )
    return json_obj({"message": "Batch stopped successfully"})


async def delete_batch(request: web.Request) -> web.Response:
    auth.require(request, auth.WRITE)
    pipeline_id = path_id(request, "pipeline_id")
    batch_id = path_id(request, "batch_id")
    store = request.app[STORE]
    fields = await store.fields(pipeline_id, batch_id)
    if fields is None or "deleted" in fields:
        raise not_found(f"unknown batch {batch_id} of pipeline {pipeline_id}")
    # Queue the clean-up first: if Kafka refuses, the batch stays visible and nothing changed.
    await request.app[COMMANDS].command(
        Command("delete", batch_id, pipeline_id, pipeline_version=fields["pipeline_version"])
    )
    await store.hide(pipeline_id, batch_id)
    request.app[CACHE].evict(keys.batch(pipeline_id, batch_id))
    return json_obj({"message": "Batch deleted successfully"})
