"""`POST /api/v1/batches/{pipeline_id}/{batch_id}/resume`: a new batch that goes on where a
stopped, not completed batch stopped (issue 10, part 3).

The new batch runs the old one's pipeline version with the old effective config, the body's
overrides merged over it (`{"config": {...}}`, as a run's). It is recorded with what the old
batch achieved, so the flow knows where to go on from (`pipelines.flow`) and GET shows it from
the start: every step that was `success` is `success` with its offsets (and totals); the
first step that was not carries the old offsets, which it starts each partition from; the
steps after it start from zero. `resumed_from` names the old batch, whose data the steps
take over. An Idempotency-Key works as for a run: one new batch per key and request.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from core import layout
from core.command_messages import Recorded
from core.models import PipelineSpec, new_batch_id
from service import auth, creates, idempotency, run_body
from service.appkeys import COMMANDS, IDEMPOTENCY, REGISTRY, STORE
from service.batches import json_obj, once, path_id
from service.errors import ApiError, not_found


def resumed_fields(spec: PipelineSpec, old: dict[str, str], old_id: str,
                   config: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The new batch's fields beyond a fresh batch's (`BatchStore.create`'s `extra`)."""
    fields = {layout.CONFIG: orjson.dumps(config).decode(), layout.RESUMED_FROM: old_id}
    for step in spec.step_names:
        done = layout.step_state(old, step) == "success"
        if done:
            fields[layout.step_field(step)] = "success"
        for partition, offset in layout.step_offsets(old, step).items():
            fields[layout.offset_field(step, partition)] = str(offset)
        for partition, total in layout.step_totals(old, step).items():
            fields[layout.total_field(step, partition)] = str(total)
        if not done:
            # The first step not done goes on from its offsets (not counted in its rate);
            # the rest start from zero.
            fields[layout.RESUMED_PREFIX + step] = str(sum(layout.step_offsets(old, step)
                                                           .values()))
            break
    return fields


async def resume_batch(request: web.Request) -> web.Response:
    auth.require(request, auth.WRITE)
    pipeline_id = path_id(request, "pipeline_id")
    old_id = path_id(request, "batch_id")
    header = request.headers.get("Idempotency-Key")
    idem_key = idempotency.record_key(header) if header is not None else None
    overrides = await run_body.overrides_of(request)
    store = request.app[STORE]
    old = await store.fields(pipeline_id, old_id)
    target = f"resume {old_id}"
    canonical = run_body.canonical(overrides)
    if not layout.is_visible(old):
        if idem_key is not None:
            # A retry whose first attempt succeeded answers its batch, though the old one
            # has been deleted since (its version, which the record holds, never changes).
            replayed = await request.app[IDEMPOTENCY].replayed(
                idem_key, lambda earlier: idempotency.Sent.of(
                    pipeline_id, str(earlier.get("v")), canonical, target=target))
            if replayed is not None:
                return json_obj({"item": replayed})
        raise not_found(f"unknown batch {old_id} of pipeline {pipeline_id}")
    if old["state"] != "stop":
        raise ApiError(409, "conflict", f"batch {old_id} is {old['state']}: only a stopped "
                       "batch can be resumed; stop it first", state=old["state"])
    if old.get("outcome") == "completed":
        raise ApiError(409, "conflict", f"batch {old_id} completed: there is nothing left to "
                       "resume", outcome="completed")
    version = old["pipeline_version"]
    spec = await creates.spec_of(request.app[REGISTRY], pipeline_id, version)
    if spec is None:  # versions are never removed; a pipeline removed from Redis by hand
        raise not_found(f"unknown version {version} of pipeline {pipeline_id}")
    config = run_body.checked_config(spec, overrides, base=layout.config_of(old))
    batch_id = new_batch_id()
    extra = resumed_fields(spec, old, old_id, config)

    async def record() -> creates.Created:
        # After an Idempotency-Key's claim: a retry of a resume that succeeded answers its
        # batch while Kafka is down.
        request.app[COMMANDS].check()  # Kafka known down: 503 at once, before any write
        seq = await store.create(pipeline_id, batch_id, spec, extra=extra)
        # Read back for its run command (a rebuild's record): the time Redis recorded. A
        # resume is rare; the POST's hot path sends the time it gave its create script,
        # and the rebuild raises it as that script would.
        fields = await store.fields(pipeline_id, batch_id) or {}
        # 0: the batch existed, so the create ran on a try whose reply was lost (its id is
        # new to this request).
        seq = seq or int(fields["seq"])
        return creates.Created(spec, Recorded(seq=seq, created_at=fields.get("created_at", ""),
                                              extra=extra))

    sent = (idempotency.Sent.of(pipeline_id, version, canonical, target=target)
            if idem_key is not None else None)
    return await once(request, idem_key, sent, pipeline_id, batch_id, record)
