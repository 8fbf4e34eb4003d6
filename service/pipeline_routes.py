"""The pipeline registry endpoints: immutable versions of each pipeline's definition."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from core import layout
from core.codec import Command
from core.models import PipelineSpec, deployment_name
from core.registry import Registered, registered_body
from core.retry import describe
from core.snapshots import RECORD_LIMIT, pipeline_key, pipeline_record
from core.step_catalogue import config_problems, known_steps
from service import query_params
from service.appkeys import COMMANDS, PRODUCER, REGISTRY, SETTINGS
from service.batches import json_obj, path_id
from service.command_sender import UNAVAILABLE_MESSAGE, Ambiguous, Refused
from service.errors import ApiError, bad_request, not_found
from service.request_log import detached
from service.run_body import refuse_duplicate_keys, refuse_unsendable

log = logging.getLogger(__name__)

# Below a client's usual 10 s timeout, far above a healthy broker's acknowledgement.
RECORD_TIMEOUT_S = 5.0


def _describe(pipeline_id: str, versions: list[PipelineSpec]) -> dict[str, Any]:
    latest = versions[-1]
    return {
        "id": pipeline_id,
        "name": latest.name,
        "deployment": deployment_name(latest.name),
        "latest": latest.version,
        "versions": [
            {**spec.model_dump(mode="json"), "latest": spec is latest} for spec in versions
        ],
    }


async def put_pipeline(request: web.Request) -> web.Response:
    pipeline_id = path_id(request, "pipeline_id")
    query_params.refuse_unknown(request, (), "the pipeline's registration")
    raw = await request.read()
    refuse_duplicate_keys(raw, "invalid pipeline definition")
    try:
        spec = PipelineSpec.model_validate_json(raw)
    except ValidationError as exc:
        problems = [
            {"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]} for e in exc.errors()
        ]
        raise bad_request("invalid pipeline definition", problems=problems) from None
    unknown = sorted({step.uses for step in spec.steps} - known_steps())
    if unknown:
        # Only registered implementations run: a definition must not choose arbitrary code.
        raise bad_request("unknown step implementation", unknown=unknown,
                          known=sorted(known_steps()))
    # Each implementation's own config model, checked now rather than when a run starts; it
    # also refuses any value naming a path on the worker's disk (a server-side setting).
    problems = [problem for i, step in enumerate(spec.steps)
                for problem in config_problems(step.uses, step.config, f"steps.{i}.config")]
    if problems:
        raise bad_request("invalid step config", problems=problems)
    # Every batch of the version carries its config in its run command: one Kafka could
    # never take would make each POST of it a 503.
    refuse_unsendable({layout.CONFIG: layout.registered_config(spec)}, "the definition's config")
    return await _register(request, pipeline_id, spec)


async def _register(request: web.Request, pipeline_id: str, spec: PipelineSpec) -> web.Response:
    """The version's durable record (the compacted pipelines topic a rebuild of Redis reads)
    is on Kafka before the version is registered in Redis, where runs can use it: no batch
    runs a version a rebuild would not know. A 503 before the registration has registered
    nothing; the one exception is a PUT that raced another and whose repair of the topic's
    record Kafka then refused: registered, it still answers 503, since only its retry (which
    writes the record again) leaves the topic saying what Redis holds. A record written for
    a PUT that failed after it (Redis away) registers its version at the next rebuild, as
    the client's retry would. So does a record Kafka confirms after the 503 of its wait
    (`_record`): then it is registered at once if still at its place (never after versions
    accepted since), or, another definition of the version held, that one's record is
    written again after it (`_settle_late`), so the topic a rebuild reads says what Redis
    says."""
    registry = request.app[REGISTRY]
    request.app[COMMANDS].check()  # Kafka known down: 503 at once, as for a command
    held = await registry.versions(pipeline_id)
    order = next((n for n, v in enumerate(held) if v.version == spec.version), len(held))
    # Compared as the registration script compares them: by the registered text.
    if order < len(held) and registered_body(held[order]) != registered_body(spec):
        # The held definition's record again: a PUT that lost a race to register this
        # version may have written its own record after the winner's and failed to write
        # the winner's again (a 503); its retry, refused here, repairs the topic.
        await _record(request, pipeline_id, spec.version,
                      pipeline_record(pipeline_id, held[order], order))
        raise _conflict(pipeline_id, spec)
    record = pipeline_record(pipeline_id, spec, order)
    if len(record) > RECORD_LIMIT:
        # Kafka would refuse it on every retry: not a 503.
        raise ApiError(413, "payload_too_large",
                       f"the definition's durable record would be {len(record):,} bytes; at "
                       f"most {RECORD_LIMIT:,} fit in one Kafka record")
    # Written for an unchanged version too: a client retrying after a 503 writes the record
    # its first attempt may have missed.
    await _record(request, pipeline_id, spec.version, record, (spec, order))
    try:
        outcome, versions = await _registered(request.app, pipeline_id, spec, order)
    except (KafkaError, TimeoutError):  # the repair's record: registered, yet a 503
        raise ApiError(503, "unavailable", UNAVAILABLE_MESSAGE) from None
    if outcome is Registered.CONFLICT:
        raise _conflict(pipeline_id, spec)
    # The commands consumer creates or updates the Prefect deployment `run-pipeline/<name>`.
    # Sent for an unchanged version too: a PUT again heals the deployment. Not queued, it is
    # no 503: the version is recorded and registered (GET shows it latest, POSTs run it),
    # and a run ensures its deployment itself; "retry later" said the PUT had not happened.
    try:
        await request.app[COMMANDS].command(Command("deploy", "", pipeline_id, spec.version))
    except (Refused, Ambiguous):
        log.warning("pipeline %s version %s registered; its deploy command was not queued "
                    "(its first run deploys it)", pipeline_id, spec.version)
    created = outcome is Registered.CREATED
    return json_obj({**_describe(pipeline_id, versions), "created": created},
                    status=201 if created else 200)


def _conflict(pipeline_id: str, spec: PipelineSpec) -> ApiError:
    return ApiError(409, "conflict",
                    f"version {spec.version} of {pipeline_id} exists with another definition")


async def _registered(app: web.Application, pipeline_id: str, spec: PipelineSpec,
                      order: int, late: bool = False) -> tuple[Registered, list[PipelineSpec]]:
    """`spec` registered, its record (at `order`) on the topic already; the registry's
    versions after. A concurrent PUT that registered this version with another body, or
    another version in the place this one was to take, after our read: the topic's last
    record of this version is written again as Redis holds it. `late` (a record confirmed
    after its PUT's 503): registered only at its recorded place, never after versions
    accepted since (MOVED: left to the client's retry, a rebuild puts it at its place)."""
    registry = app[REGISTRY]
    outcome = await registry.register(pipeline_id, spec, at=order if late else None)
    if outcome is Registered.MOVED:
        return outcome, []
    versions = await registry.versions(pipeline_id)
    registered = next(n for n, v in enumerate(versions) if v.version == spec.version)
    if outcome is Registered.CONFLICT or registered != order:
        await _send(app, pipeline_id, spec.version,
                    pipeline_record(pipeline_id, versions[registered], registered))
    return outcome, versions


async def _record(request: web.Request, pipeline_id: str, version: str, record: bytes,
                  new: tuple[PipelineSpec, int] | None = None) -> None:
    """Writes a version's record (`pipeline_record`, acks=all); a 503 when Kafka does not
    confirm it in RECORD_TIMEOUT_S. `new`: the definition and order the record is of, when
    it is not one Redis holds already (its late confirmation registers it)."""
    try:
        await _send(request.app, pipeline_id, version, record, new)
    except (KafkaError, TimeoutError):
        raise ApiError(503, "unavailable", UNAVAILABLE_MESSAGE) from None


async def _send(app: web.Application, pipeline_id: str, version: str, record: bytes | None,
                new: tuple[PipelineSpec, int] | None = None) -> None:
    """The record (None: a tombstone) confirmed within RECORD_TIMEOUT_S, else TimeoutError
    or KafkaError; a `new` one confirmed later is settled then (`_settle_late`)."""
    delivery: asyncio.Future[Any] | None = None
    try:
        async with asyncio.timeout(RECORD_TIMEOUT_S):
            delivery = await app[PRODUCER].send(app[SETTINGS].topic_pipelines, record,
                                                key=pipeline_key(pipeline_id, version))
            await asyncio.shield(delivery)
    except TimeoutError:
        # Queued, the record is still delivered: a wait that ran out withdraws nothing.
        if delivery is not None and new is not None:
            task = detached(_settle_late(app, pipeline_id, *new, delivery),
                            f"late record of {pipeline_id} {version}")
            _LATE.add(task)
            task.add_done_callback(_LATE.discard)
        raise


async def _withdraw(app: web.Application, pipeline_id: str, version: str) -> None:
    """A late record that lost its place: a rebuild would register its version after the
    ones accepted since, the latest. Its record is withdrawn (a tombstone on the compacted
    topic), then, should the client's retry have registered the version meanwhile, written
    again as Redis holds it."""
    try:
        await _send(app, pipeline_id, version, None)
        versions = await app[REGISTRY].versions(pipeline_id)
        held = next((n for n, v in enumerate(versions) if v.version == version), None)
        if held is not None:
            await _send(app, pipeline_id, version,
                        pipeline_record(pipeline_id, versions[held], held))
    except Exception as exc:
        log.warning("pipeline %s version %s: its record was confirmed after its PUT's 503 and "
                    "lost its place, and was not withdrawn (%s): a rebuild registers it "
                    "after the versions accepted since", pipeline_id, version, describe(exc))
        return
    log.warning("pipeline %s version %s: its record was confirmed after its PUT's 503 and "
                "versions were registered since: withdrawn (the client's retry registers it)",
                pipeline_id, version)


async def settle_late_records(producer: AIOKafkaProducer, within_s: float) -> None:
    """At shutdown, before the producer stops: the late records sent and settled (a record
    the producer's stop still delivers, its settlement dropped, would stay on the topic
    unregistered, or not withdrawn, for a rebuild to find)."""
    if not _LATE:
        return
    with contextlib.suppress(Exception):
        async with asyncio.timeout(within_s):
            await producer.flush()
            await asyncio.wait(set(_LATE))
    for task in [task for task in _LATE if not task.done()]:
        log.error("shutdown: %s left unsettled: Redis and the pipelines topic may disagree "
                  "on that version (PUT it again)", task.get_name())


# Records confirmed after their PUT's 503, being settled (kept from the garbage collector).
_LATE: set[asyncio.Task[None]] = set()


async def _settle_late(app: web.Application, pipeline_id: str, spec: PipelineSpec, order: int,
                       delivery: asyncio.Future[Any]) -> None:
    """A record whose PUT answered 503, once Kafka confirms it after all: a rebuild would
    register its version from it, so Redis registers it now; should another definition of
    the version be held (a rival PUT won meanwhile), that one's record goes after it."""
    try:
        await delivery
    except Exception:
        return  # not written: nothing to settle
    try:
        outcome, _ = await _registered(app, pipeline_id, spec, order, late=True)
    except Exception as exc:
        # Left as a PUT that failed after its record (Redis away): the next rebuild, or the
        # client's retry, registers it.
        log.warning("pipeline %s version %s: its record was confirmed after its PUT's 503 "
                    "and is not registered yet (%s)", pipeline_id, spec.version, describe(exc))
        return
    if outcome is Registered.MOVED:
        await _withdraw(app, pipeline_id, spec.version)
        return
    log.info("pipeline %s version %s: its record was confirmed after its PUT's 503; "
             "registered as the topic says", pipeline_id, spec.version)


async def get_pipeline(request: web.Request) -> web.Response:
    pipeline_id = path_id(request, "pipeline_id")
    versions = await request.app[REGISTRY].versions(pipeline_id)
    if not versions:
        raise not_found(f"unknown pipeline {pipeline_id}")
    return json_obj(_describe(pipeline_id, versions))


async def list_pipelines(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    items: dict[str, Any] = {}
    for pipeline_id in await registry.ids():
        versions = await registry.versions(pipeline_id)
        if versions:
            items[pipeline_id] = _describe(pipeline_id, versions)
    return web.Response(body=orjson.dumps({"items": items}), content_type="application/json")
