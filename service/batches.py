"""The endpoints of one batch (GET, the pipeline's latest, stop, delete) and the JSON answers
and path ids every route shares. Reads come from Redis (through the cache); changes are
queued as commands on Kafka and recorded in Redis. Of the contract's other batch endpoints,
the run is `service.runs`, the paged list `service.listing`."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import orjson
from aiohttp import web

from core import keys
from core.codec import Command
from core.layout import is_visible
from core.models import valid_id
from core.retry import Verdict, classify, describe
from service import conditional, query_params, streams
from service.appkeys import ABANDONER, CACHE, COMMANDS, STORE
from service.cache import etag_of
from service.command_sender import Ambiguous, Refused
from service.errors import ApiError, bad_request, not_found
from service.fills import fills_of

log = logging.getLogger(__name__)


def json_bytes(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


def json_obj(data: Any, status: int = 200) -> web.Response:
    return json_bytes(orjson.dumps(data), status)


def path_id(request: web.Request, name: str) -> str:
    value = request.match_info[name]
    if not valid_id(value):
        raise bad_request(f"{name} must match [A-Za-z0-9._-]{{1,128}}")
    return value


async def _read_batch(request: web.Request) -> bytes:
    """The batch from Redis, rendered, and kept in the cache unless it changed meanwhile
    (the misses of one loop turn are read in one round trip: `service.fills`)."""
    return (await _read_version(request))[0]


async def _read_version(request: web.Request) -> tuple[bytes, int]:
    """As `_read_batch`, with the hash's rev: what orders the versions a stream sends or a
    long-poll answers (service.cache)."""
    pipeline_id = path_id(request, "pipeline_id")
    batch_id = path_id(request, "batch_id")
    read = await fills_of(request.app[STORE], request.app[CACHE]).read_version(
        pipeline_id, batch_id)
    if read is None:
        raise not_found(f"unknown batch {batch_id} of pipeline {pipeline_id}")
    return read


async def get_batch(request: web.Request) -> web.StreamResponse:
    match = request.match_info
    key = keys.batch(match["pipeline_id"], match["batch_id"])
    if streams.wants_stream(request):
        return await streams.stream_batch(request, key, _read_version)
    if "If-None-Match" in request.headers:
        return await conditional.answer(request, key, _read_version)
    if request.query_string:
        conditional.wait_s(request)  # validated even where there is nothing to wait for
    # The hot path: only ids that passed validation were ever cached, so a hit needs no check.
    entry = request.app[CACHE].lookup(key)
    if entry is not None:
        return conditional.tagged(entry[0], entry[2])  # type: ignore[arg-type]
    body = await _read_batch(request)
    return conditional.tagged(body, etag_of(body))


async def latest_batch(request: web.Request) -> web.Response:
    pipeline_id = path_id(request, "pipeline_id")
    query_params.refuse_unknown(
        request, ("wait",), "the latest batch",
        hint=f" (filters, limit and token are the list's: /api/v1/batches/{pipeline_id}/, "
             "limit=1 for the newest match)")

    async def read(request: web.Request) -> bytes:
        batch = await request.app[STORE].latest(pipeline_id)
        if batch is None:
            raise not_found(f"pipeline {pipeline_id} has no batch")
        return orjson.dumps(batch)

    if "If-None-Match" in request.headers:
        # Held on any change of the pipeline's batches (a new one included): the latest is one.
        return await conditional.answer_pipeline(request, pipeline_id, read)
    if request.query_string:
        conditional.wait_s(request)
    body = await read(request)
    return conditional.tagged(body, etag_of(body))


async def stop_batch(request: web.Request) -> web.Response:
    pipeline_id = path_id(request, "pipeline_id")
    batch_id = path_id(request, "batch_id")
    query_params.refuse_unknown(request, (), "the stop")
    fields = await request.app[STORE].fields(pipeline_id, batch_id)
    if not is_visible(fields):
        raise not_found(f"unknown batch {batch_id} of pipeline {pipeline_id}")
    # Stopping a stopped batch answers 200 again without queueing anything new.
    if fields["state"] != "stop":
        version = fields["pipeline_version"]
        try:
            await request.app[COMMANDS].command(
                Command("stop", batch_id, pipeline_id, pipeline_version=version))
        except Ambiguous:
            # The stop may be written already, so it may happen: a 503 would say the batch
            # runs on. Sent again from the outbox until Kafka confirms one, it happens (with
            # Redis away too, no outbox holds it: 503, and the client's retry is safe).
            await request.app[ABANDONER].resend_stop(pipeline_id, batch_id, version)
    return json_obj({"message": "Batch stopped successfully"})


async def delete_batch(request: web.Request) -> web.Response:
    pipeline_id = path_id(request, "pipeline_id")
    batch_id = path_id(request, "batch_id")
    query_params.refuse_unknown(request, (), "the delete")
    store = request.app[STORE]
    fields = await store.fields(pipeline_id, batch_id)
    if not is_visible(fields):
        raise not_found(f"unknown batch {batch_id} of pipeline {pipeline_id}")
    claim = await store.begin_delete(pipeline_id, batch_id)
    resumes = claim.resumes
    if resumes:  # they take its files over when their first step starts
        raise ApiError(409, "conflict", f"batch {batch_id}'s data is still needed by its "
                       f"resume {', '.join(resumes)}, not stopped yet: delete it once that "
                       "stopped (or stop it first)", resumed_by=resumes)
    # Queue the clean-up first: if Kafka refuses, the batch stays visible and nothing changed.
    version = fields["pipeline_version"]
    try:
        await request.app[COMMANDS].command(Command("delete", batch_id, pipeline_id,
                                                    pipeline_version=version))
    except Ambiguous:
        # The delete may be written already: the batch is hidden in any case and its delete
        # queued again from the outbox, so the answer is the one a retry would get (with
        # Redis away too, no outbox holds it: 503, and the client's retry is safe).
        await request.app[ABANDONER].abandon(pipeline_id, batch_id, version,
                                             "deleted through the batches API", released=False)
    except Refused:
        # Not written: nothing changed, so resumes of the batch may go on again now rather
        # than once the mark expires (anything else may have been written: the mark stays).
        with contextlib.suppress(Exception):
            await store.end_delete(pipeline_id, batch_id, claim.token)
        raise
    try:
        await store.hide(pipeline_id, batch_id)
    except Exception as exc:
        if classify(exc) is not Verdict.UNAVAILABLE:
            raise
        # The delete command is durable: the commands consumer hides and purges the batch
        # whatever happens here. A 503 would tell the client nothing changed, and it has.
        log.warning("batch %s/%s: delete queued, not hidden yet (%s); the commands consumer "
                    "hides it", pipeline_id, batch_id, describe(exc))
    request.app[CACHE].evict(keys.batch(pipeline_id, batch_id))
    return json_obj({"message": "Batch deleted successfully"})
