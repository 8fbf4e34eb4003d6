"""`POST /api/v1/batches/{pipeline_id}/{batch_id}/resume`: a new batch that goes on where a
stopped, not completed batch stopped (issue 10, part 3).

The new batch runs the old one's pipeline version with the old effective config, the body's
overrides merged over it (`{"config": {...}}`, as a run's). It is recorded with what the old
batch achieved, so the flow knows where to go on from (`pipelines.flow`) and GET shows it from
the start: every step that was `success` is `success` with its offsets (and totals); the
first step that was not carries the old offsets, which it starts each partition from; the
steps after it start from zero. `resumed_from` names the batch whose data the steps take
over: the old one, or, when none of its steps ever ran, the batch it went on from itself
(that batch, not one of its id created later: a published id may run again once deleted).

The overrides cannot make the new batch show a config its data was not made with (400): a
`success` step's config stays as it ran (it does not run again), and the step that goes on
over data it wrote keeps the keys that shaped that data (`step_catalogue.SHAPES_DATA`; for
the sales steps rows, partitions, seed, invalid_rate); how it runs (`fail_at`, `throttle`)
may change. The batch holding the data cannot be deleted (409) until its resumes stopped
(`BatchStore.live_resumes`): they take the files over only when their first step starts.
An Idempotency-Key works as for a run: one new batch per key and request, which a retry
refused by what changed since (the old batch or the data holder deleted) still answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from core import keys, layout
from core.command_messages import Recorded
from core.models import PipelineSpec, new_batch_id
from core.run_config import resume_problems
from core.store import BatchStore
from service import creates, idempotency, query_params, run_body
from service.appkeys import API_SCRIPTS, COMMANDS, IDEMPOTENCY, REGISTRY, STORE
from service.batches import json_obj, path_id
from service.errors import ApiError, bad_request, not_found
from service.runs import once


def data_holder(spec: PipelineSpec, old: Mapping[str, str], old_id: str) -> str:
    """The batch whose directory holds the data a resume of `old` goes on with: `old`'s,
    unless none of its steps ever ran (a resume that stopped before its first step, when
    it would have taken the files over): then the batch it went on from still holds them."""
    if layout.RESUMED_FROM not in old or any(f.startswith(layout.STARTED_PREFIX) for f in old):
        return old_id
    # A step that ran has a `started:` field (its `running` event); the states say it too
    # (steps from the one it was created to go on with are recorded `none` until they run),
    # so a lost `running` event does not point the resume at data older than old's.
    names = spec.step_names
    first = next((n for n in names if layout.RESUMED_PREFIX + n in old), names[-1])
    later = names[names.index(first):]
    ran = any(layout.step_state(old, step) not in ("none", "pending") for step in later)
    return old_id if ran else old[layout.RESUMED_FROM]


def going_on(spec: PipelineSpec, old: Mapping[str, str], holder: Mapping[str, str]
             ) -> str | None:
    """The step the resume goes on with over data it wrote: the first step not `success`,
    when it started in the batch holding the data (or has offsets carried from it)."""
    step = next((s for s in spec.step_names if layout.step_state(old, s) != "success"), None)
    if step is None:
        return None
    started = layout.STARTED_PREFIX + step
    return step if started in old or started in holder or layout.step_offsets(old, step) \
        else None


def resumed_fields(spec: PipelineSpec, old: dict[str, str], holder_id: str,
                   config: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The new batch's fields beyond a fresh batch's (`BatchStore.create`'s `extra`);
    `holder_id`: the batch whose data the steps take over (`data_holder`)."""
    fields = {layout.CONFIG: orjson.dumps(config).decode(), layout.RESUMED_FROM: holder_id}
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


@dataclass(frozen=True, slots=True)
class _Plan:
    """A resume that passed its checks: what `record` creates."""

    spec: PipelineSpec
    holder_id: str  # the batch whose data it goes on with (`data_holder`)
    taking_data: bool  # whether it takes any (`needs_data`)
    extra: dict[str, str]  # its fields beyond a fresh batch's (`resumed_fields`)


async def resume_batch(request: web.Request) -> web.Response:
    pipeline_id = path_id(request, "pipeline_id")
    old_id = path_id(request, "batch_id")
    query_params.refuse_unknown(request, (), "the resume")
    header = request.headers.get("Idempotency-Key")
    idem_key = idempotency.record_key(header) if header is not None else None
    overrides = await run_body.overrides_of(request)
    target = f"resume {old_id}"
    canonical = run_body.canonical(overrides)
    try:
        plan = await _checked(request, pipeline_id, old_id, overrides)
    except ApiError:
        # What changes after a resume succeeded (the old batch or its data holder deleted,
        # the old id run again) refuses its retry: the key's batch is the answer then. The
        # version compared is the record's: a resume's is not the client's to send, but the
        # old batch's, which a batch of its id made later may not share.
        if idem_key is not None:
            replayed = await request.app[IDEMPOTENCY].replayed(
                idem_key, lambda earlier: idempotency.Sent.of(
                    pipeline_id, str(earlier.get("v")), canonical, target=target))
            if replayed is not None:
                return json_obj({"item": replayed})
        raise
    store = request.app[STORE]
    batch_id = new_batch_id()
    holder_id, extra = plan.holder_id, plan.extra

    async def record(batch_id: str) -> creates.Created:
        # After an Idempotency-Key's claim: a retry of a resume that succeeded answers its
        # batch while Kafka is down.
        request.app[COMMANDS].check()  # Kafka known down: 503 at once, before any write
        # Noted before the batch exists, so a delete of the holder never misses it (one
        # noted recently counts as being created when a delete looks). A resume taking no
        # data over needs no note, and no holder.
        if plan.taking_data:
            await store.note_resume(pipeline_id, holder_id, batch_id)
            if not await store.resume_may_go_on(pipeline_id, holder_id, batch_id):
                raise ApiError(409, "conflict", f"batch {holder_id}, whose data batch "
                               f"{old_id} goes on from, is being deleted: there is nothing "
                               "to resume from", resumed_from=holder_id)
        # Should this process die before its run command is sent, a sweep sends it.
        await request.app[API_SCRIPTS].enter_unsent(keys=[keys.unsent_runs(pipeline_id)],
                                                    args=[batch_id])
        seq = await store.create(pipeline_id, batch_id, plan.spec, extra=extra)
        # Read back for its run command (a rebuild's record): the time Redis recorded. A
        # resume is rare; the POST's hot path sends the time it gave its create script,
        # and the rebuild raises it as that script would.
        fields = await store.fields(pipeline_id, batch_id) or {}
        # 0: the batch existed, so the create ran on a try whose reply was lost (its id is
        # new to this request).
        seq = seq or int(fields["seq"])
        return creates.Created(plan.spec, Recorded(
            seq=seq, created_at=fields.get("created_at", ""), extra=extra))

    sent = (idempotency.Sent.of(pipeline_id, plan.spec.version, canonical, target=target)
            if idem_key is not None else None)
    return await once(request, idem_key, sent, pipeline_id, batch_id, record)


async def _checked(request: web.Request, pipeline_id: str, old_id: str,
                   overrides: run_body.Overrides) -> _Plan:
    """The resume of `old_id` with `overrides`, or the ApiError that refuses it (nothing
    written either way)."""
    store = request.app[STORE]
    old = await store.fields(pipeline_id, old_id)
    if not layout.is_visible(old):
        raise not_found(f"unknown batch {old_id} of pipeline {pipeline_id}")
    if old["state"] != "stop":
        raise ApiError(409, "conflict", f"batch {old_id} is {old['state']}: only a stopped "
                       "batch can be resumed; stop it first", state=old["state"])
    if old.get("outcome") == "completed":
        raise ApiError(409, "conflict", f"batch {old_id} completed: there is nothing left to "
                       "resume", outcome="completed")
    version = old["pipeline_version"]
    # Read, not the POSTs' cached definition: a version registered again after Redis lost
    # it may hold another one (only a POST of the latest has its create check that).
    spec = await request.app[REGISTRY].get(pipeline_id, version)
    if spec is None:  # versions are never removed; a pipeline removed from Redis by hand
        raise not_found(f"unknown version {version} of pipeline {pipeline_id}")
    base = layout.config_of(old)
    config = run_body.checked_config(spec, overrides, base=base)
    holder_id = data_holder(spec, old, old_id)
    holder = old if holder_id == old_id else await _made_from(store, pipeline_id, holder_id,
                                                              old)
    taking_data = needs_data(spec, old)
    if holder is None and taking_data:
        raise ApiError(409, "conflict", f"batch {old_id} goes on from the data of batch "
                       f"{holder_id}, deleted since: there is nothing to resume from",
                       resumed_from=holder_id)
    done = [step for step in spec.step_names if layout.step_state(old, step) == "success"]
    problems = resume_problems(spec, base or {}, config, done, going_on(spec, old, holder or {}))
    if problems:
        raise bad_request("a resume goes on with the data its batch made: it cannot change "
                          "the config that data was made with", problems=problems)
    extra = resumed_fields(spec, old, holder_id, config)
    run_body.refuse_unsendable(extra, "the resume's config and the offsets it goes on from")
    return _Plan(spec, holder_id, taking_data, extra)


async def _made_from(store: BatchStore, pipeline_id: str, holder_id: str,
                     old: Mapping[str, str]) -> dict[str, str] | None:
    """The fields of the batch `holder_id` when it is the one whose data `old` was made to
    go on with: visible, and created before `old`. A batch of its id created later is
    another (a published id run again once the deleted one's claim expired): it holds none
    of that data, and a resume noted in its resumed-by set would keep it from its delete."""
    holder = await store.fields(pipeline_id, holder_id)
    return holder if layout.is_visible(holder) and layout.created_before(holder, old) else None


def needs_data(spec: PipelineSpec, old: Mapping[str, str]) -> bool:
    """Whether a resume of `old` takes any data over: a step done or offsets to go on from."""
    return any(layout.step_state(old, step) == "success" or layout.step_offsets(old, step)
               for step in spec.step_names)
