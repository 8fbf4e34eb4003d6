"""The six batch endpoints of the contract. Reads come from Redis (through the cache);
changes are recorded in Redis and queued as commands on Kafka."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import orjson
from aiohttp import web

from core import keys
from core.codec import Command
from core.layout import is_visible
from core.models import PipelineSpec, new_batch_id, valid_id
from core.retry import Verdict, classify, describe
from service import auth, conditional, creates, idempotency, query_params, run_body, streams
from service.appkeys import (
    ABANDONER,
    API_SCRIPTS,
    CACHE,
    COMMANDS,
    IDEMPOTENCY,
    REGISTRY,
    STORE,
)
from service.cache import etag_of
from service.command_sender import Ambiguous, Refused
from service.errors import ApiError, bad_request, not_found
from service.fills import fills_of
from service.turns import turn_reads

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


async def _resolve(request: web.Request, pipeline_id: str, version: str | None) -> PipelineSpec:
    registry = request.app[REGISTRY]
    if version is None:
        known = creates.known_latest(registry, pipeline_id)
        if known is None:
            # Which version is latest: read with the other POSTs of this loop turn (service.turns).
            known = await turn_reads(registry.redis).read(
                "LINDEX", keys.pipeline_order(pipeline_id), "-1")
        # Only a guess from here: the create checks it is still the latest (service.creates).
        return await creates.latest_spec(registry, pipeline_id, known)
    # A version asked for by name is read each time: that read is what says it exists.
    spec = await registry.get(pipeline_id, version)
    if spec is None:
        if await registry.latest_version(pipeline_id) is None:
            raise not_found(f"unknown pipeline {pipeline_id}")
        raise not_found(f"unknown version {version} of pipeline {pipeline_id}")
    return spec


async def _checked_against_latest(request: web.Request, pipeline_id: str,
                                  requested: str | None, spec: PipelineSpec,
                                  overrides: run_body.Overrides) -> PipelineSpec:
    """`spec` (or the latest version read again), once the overrides are valid for it. The
    latest version `_resolve` gives is this process's last-seen one: a version registered
    since (by a PUT here or elsewhere) is learnt by a create, which a refusal comes before.
    So a refusal of the guess is confirmed against the latest Redis holds."""
    try:
        run_body.checked_config(spec, overrides)
        return spec
    except ApiError:
        if requested is not None:
            raise
        registry = request.app[REGISTRY]
        latest = await creates.latest_spec(registry, pipeline_id,
                                           await registry.latest_version(pipeline_id))
        if latest.version == spec.version:
            raise
    run_body.checked_config(latest, overrides)
    return latest


async def run_batch(request: web.Request) -> web.Response:
    auth.require(request, auth.WRITE)
    pipeline_id = path_id(request, "pipeline_id")
    given = request.query.getall("pipeline_version", [])
    if len(given) > 1:  # which one was meant is anybody's guess, as in the list's filters
        raise bad_request("pipeline_version is given more than once")
    requested = given[0] if given else None
    if requested is not None and not valid_id(requested):
        raise bad_request("pipeline_version must match [A-Za-z0-9._-]{1,128}")
    header = request.headers.get("Idempotency-Key")
    idem_key = idempotency.record_key(header) if header is not None else None
    overrides = await run_body.overrides_of(request)
    sent = (idempotency.Sent.of(pipeline_id, requested, run_body.canonical(overrides))
            if idem_key is not None else None)
    try:
        spec = await _resolve(request, pipeline_id, requested)
        config = None
        if overrides:
            # Refused before anything is written.
            spec = await _checked_against_latest(request, pipeline_id, requested, spec,
                                                 overrides)

            def config(spec: PipelineSpec) -> dict[str, dict[str, Any]]:
                # For the version recorded: another may have become the latest meanwhile.
                return run_body.checked_config(spec, overrides)
        request.app[COMMANDS].check()  # Kafka known down: 503 at once, before any write
    except ApiError:
        # What changes (the latest version, Kafka's health) can refuse a retry of a request
        # that succeeded: the key's batch is the answer then.
        if idem_key is not None and sent is not None:
            replayed = await request.app[IDEMPOTENCY].replayed(idem_key, lambda _: sent)
            if replayed is not None:
                return json_obj({"item": replayed})
        raise
    batch_id = new_batch_id()

    async def record() -> creates.Created:
        return await creates.record(request.app[STORE], request.app[API_SCRIPTS],
                                    request.app[REGISTRY], pipeline_id, batch_id, spec,
                                    requested is None, config)

    return await once(request, idem_key, sent, pipeline_id, batch_id, record)


async def once(request: web.Request, idem_key: str | None, sent: idempotency.Sent | None,
               pipeline_id: str, batch_id: str,
               record: Callable[[], Awaitable[creates.Created]]) -> web.Response:
    """Creates and queues the batch, once per Idempotency-Key when one is given."""
    if idem_key is None or sent is None:
        await _create_and_queue(request, pipeline_id, batch_id, record)
        return json_obj({"item": batch_id})
    keys_ = request.app[IDEMPOTENCY]
    earlier = await keys_.claim(idem_key, sent, batch_id)
    if earlier is not None:
        return json_obj({"item": earlier})
    committed = sent.record("committed", batch_id)
    try:
        # The run command carries the committed record too, for a rebuild of Redis.
        await _create_and_queue(request, pipeline_id, batch_id, record, (idem_key, committed))
    except BaseException:
        await keys_.release(idem_key, batch_id)
        raise
    await keys_.commit(idem_key, committed, batch_id)
    return json_obj({"item": batch_id})


async def _create_and_queue(request: web.Request, pipeline_id: str, batch_id: str,
                            record: Callable[[], Awaitable[creates.Created]],
                            idempotency: tuple[str, str] | None = None) -> None:
    """Records the batch (`record` says how), then queues its run command, which carries
    the record for a rebuild of Redis. A record that failed midway is undone (purged, now or
    once Redis answers). When the send fails the batch must not run: refused, it is purged;
    ambiguous (the command may be written and even be running), it is abandoned (hidden as
    `stop`/`failed`, its delete queued behind the run)."""
    try:
        created = await record()
    except (ApiError, creates.NotThisRequests):
        raise  # refused before the create, or not a create of this request's
    except BaseException:
        # Redis may have run the create and its answer was lost: no run command will be
        # sent, so a `pending` batch left behind would never run.
        await request.app[ABANDONER].undo(pipeline_id, batch_id)
        raise
    spec = created.spec
    recorded = created.recorded
    if idempotency is not None:
        recorded = msgspec.structs.replace(recorded, idempotency_key=idempotency[0],
                                           idempotency_record=idempotency[1])
    # Its id from the batch's (one run command per batch, as `stop-<batch id>` is the
    # consumers' stop event): unique without a uuid4, whose urandom call costs a few µs.
    command = Command("run", batch_id, pipeline_id, pipeline_version=spec.version,
                      event_id="run-" + batch_id, recorded=recorded)
    try:
        await request.app[COMMANDS].command(command)
    except Refused:
        # Purged now, or once Redis answers: a batch left `pending` with no run command
        # behind it would never run.
        await request.app[ABANDONER].undo(pipeline_id, batch_id)
        raise
    except BaseException as exc:  # Ambiguous, or cancelled while Kafka held the record
        cause = exc.cause if isinstance(exc, Ambiguous) else type(exc).__name__
        reason = f"the run command was not confirmed by Kafka ({cause}); the batch will not run"
        await request.app[ABANDONER].abandon(pipeline_id, batch_id, spec.version, reason,
                                             released=True)
        request.app[CACHE].evict(keys.batch(pipeline_id, batch_id))
        raise


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
    auth.require(request, auth.READ)
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
    auth.require(request, auth.READ)
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
    auth.require(request, auth.WRITE)
    pipeline_id = path_id(request, "pipeline_id")
    batch_id = path_id(request, "batch_id")
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
    auth.require(request, auth.WRITE)
    pipeline_id = path_id(request, "pipeline_id")
    batch_id = path_id(request, "batch_id")
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
