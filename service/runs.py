"""`POST /api/v1/batches/{pipeline_id}`: a new batch of the pipeline's latest version, or of
the one `pipeline_version` names, with the body's config overrides. It is recorded in Redis
(`service.creates`), then its run command is queued on Kafka; a send that fails undoes or
abandons it, and one its process died before is made by any API process's sweep once the
create's lease passed (`service.abandon`). An Idempotency-Key makes it one batch per key and
request (`once`, which a resume shares: `service.resume`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from core import keys
from core.codec import Command
from core.models import PipelineSpec, new_batch_id, valid_id
from core.registry import registered_body
from service import creates, idempotency, query_params, run_body
from service.abandon import KeyHolder
from service.appkeys import ABANDONER, API_SCRIPTS, CACHE, COMMANDS, IDEMPOTENCY, REGISTRY, STORE
from service.batches import json_obj, path_id
from service.command_sender import Ambiguous, Refused
from service.errors import ApiError, bad_request, not_found
from service.turns import turn_reads


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
        version = await registry.latest_version(pipeline_id)
        if version is not None:
            # Read, not cached: registered again after Redis lost it, a version may hold
            # another definition, and no create comes to check it for a refused request.
            creates.forget(registry, pipeline_id, version)
        latest = await creates.latest_spec(registry, pipeline_id, version)
        if registered_body(latest) == registered_body(spec):
            raise
    run_body.checked_config(latest, overrides)
    return latest


async def run_batch(request: web.Request) -> web.Response:
    pipeline_id = path_id(request, "pipeline_id")
    # A misspelt `version=1` ignored would run the latest version, not the one asked for.
    query_params.refuse_unknown(request, ("pipeline_version",), "the run")
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

    async def record(batch_id: str) -> creates.Created:
        return await creates.record(request.app[STORE], request.app[API_SCRIPTS],
                                    request.app[REGISTRY], pipeline_id, batch_id, spec,
                                    requested is None, config)

    return await once(request, idem_key, sent, pipeline_id, batch_id, record)


async def once(request: web.Request, idem_key: str | None, sent: idempotency.Sent | None,
               pipeline_id: str, batch_id: str,
               record: Callable[[str], Awaitable[creates.Created]]) -> web.Response:
    """Creates and queues the batch, once per Idempotency-Key when one is given. `batch_id`
    is this attempt's new id; a retry that takes over a dead attempt's key finishes that
    attempt's batch instead (`service.idempotency`)."""
    if idem_key is None or sent is None:
        await _create_and_queue(request, pipeline_id, batch_id, record)
        return json_obj({"item": batch_id})
    keys_ = request.app[IDEMPOTENCY]
    claimed = await keys_.claim(idem_key, sent, batch_id)
    if not claimed.owned:
        return json_obj({"item": claimed.batch_id})
    attempt, batch_id = batch_id, claimed.batch_id
    committed = sent.record("committed", batch_id)
    # Its undo or abandon may come late (Redis away past the lease), when a retry elsewhere
    # has taken the key over and answered with the batch: they ask the key first, and hold
    # it until they are done.
    holder = KeyHolder(idem_key, attempt, keys_.lease_ms)
    # What a dead attempt left is read before anything can release the key: should the read
    # fail, its batch's fate is unknown (its run command may be on the topic), so the key
    # stays pending for the next retry to take over again. Released, a retry would run a
    # second batch beside it.
    left = (await creates.left_behind(request.app[STORE], request.app[REGISTRY], pipeline_id,
                                      batch_id) if claimed.taken_over else None)
    try:
        # The run command carries the committed record too, for a rebuild of Redis.
        if left is not None:
            await _finish(request, pipeline_id, batch_id, record, left, (idem_key, committed),
                          holder)
        else:
            await _create_and_queue(request, pipeline_id, batch_id, record,
                                    (idem_key, committed), holder)
    except BaseException:
        # Nothing of this key's is left to run: never created, undone, or abandoned. An undo
        # or abandon left waiting for Redis releases the key itself once done: released now,
        # a retry would claim afresh and run a second batch should this process die first.
        if not request.app[ABANDONER].holds(pipeline_id, batch_id):
            await keys_.release(idem_key, attempt)
        raise
    await keys_.commit(idem_key, committed, batch_id)
    if claimed.taken_over:
        await keys_.still_there(pipeline_id, batch_id)  # 409 when abandoned or deleted since
    return json_obj({"item": batch_id})


async def _finish(request: web.Request, pipeline_id: str, batch_id: str,
                  record: Callable[[str], Awaitable[creates.Created]],
                  left: creates.LeftBehind, idempotency: tuple[str, str],
                  holder: KeyHolder) -> None:
    """What a dead attempt left of its batch, finished: created if it never was, its run
    command sent again while it is pending (a run command twice runs one flow run), nothing
    once its run was taken or it is gone."""
    if left.state == "missing":
        await _create_and_queue(request, pipeline_id, batch_id, record, idempotency, holder)
    elif left.created is not None:
        await _queue(request, pipeline_id, batch_id, left.created, idempotency, holder)


async def _create_and_queue(request: web.Request, pipeline_id: str, batch_id: str,
                            record: Callable[[str], Awaitable[creates.Created]],
                            idempotency: tuple[str, str] | None = None,
                            holder: KeyHolder | None = None) -> None:
    """Records the batch (`record` says how), then queues its run command, which carries
    the record for a rebuild of Redis (`idempotency`: the key and its committed record;
    `holder`: the attempt holding the key, which its undo or abandon checks). A record that
    failed midway is undone (purged, now or once Redis answers). When the send fails the
    batch must not run: refused, it is purged; ambiguous (the command may be written and
    even be running), it is abandoned (hidden as `stop`/`failed`, its delete queued behind
    the run)."""
    try:
        created = await record(batch_id)
    except (ApiError, creates.NotThisRequests):
        raise  # refused before the create, or not a create of this request's
    except BaseException:
        # Redis may have run the create and its answer was lost: no run command will be
        # sent, so a `pending` batch left behind would never run.
        await request.app[ABANDONER].undo(pipeline_id, batch_id, holder=holder)
        raise
    await _queue(request, pipeline_id, batch_id, created, idempotency, holder)


async def _queue(request: web.Request, pipeline_id: str, batch_id: str,
                 created: creates.Created, idempotency: tuple[str, str] | None,
                 holder: KeyHolder | None) -> None:
    spec = created.spec
    recorded = created.recorded
    if idempotency is not None:
        recorded = msgspec.structs.replace(recorded, idempotency_key=idempotency[0],
                                           idempotency_record=idempotency[1])
    # Its id from the batch's (one run command per batch, as `stop-<batch id>` is the
    # consumers' stop event): unique without a uuid4, whose urandom call costs a few µs.
    command = Command("run", batch_id, pipeline_id, pipeline_version=spec.version,
                      event_id="run-" + batch_id, recorded=recorded)
    abandoner = request.app[ABANDONER]
    try:
        await request.app[COMMANDS].command(command)
    except Refused:
        # Purged now, or once Redis answers: a batch left `pending` with no run command
        # behind it would never run.
        await abandoner.undo(pipeline_id, batch_id, holder=holder)
        raise
    except BaseException as exc:  # Ambiguous, or cancelled while Kafka held the record
        cause = exc.cause if isinstance(exc, Ambiguous) else type(exc).__name__
        reason = f"the run command was not confirmed by Kafka ({cause}); the batch will not run"
        await abandoner.abandon(pipeline_id, batch_id, spec.version, reason, released=True,
                                holder=holder)
        request.app[CACHE].evict(keys.batch(pipeline_id, batch_id))
        raise
    # Its create's unsent-runs entry goes (in the background: no round trip of this POST's).
    abandoner.sent(pipeline_id, batch_id)
