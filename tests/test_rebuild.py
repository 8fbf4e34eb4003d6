"""Issue 12's acceptance test on real Kafka, Redis and Prefect: record every answer of the
API, flush Redis, rebuild it from the topics, and get the same answers (apart from
`updated_at`); running batches go on being updated and deleted ones stay deleted."""

from __future__ import annotations

import contextlib
from typing import Any, cast

from aiokafka import AIOKafkaConsumer

from consumers.commands import CommandsConsumer
from consumers.events import EventsConsumer
from consumers.export_state import export
from consumers.plumbing.cleanup import member
from consumers.plumbing.part import open_clients
from consumers.plumbing.scope import serving
from consumers.rebuild import NotEmpty, rebuild, run
from consumers.rebuild_read import partitions_of
from core import keys
from core.codec import Event
from core.connections import open_producer, open_redis
from core.models import new_batch_id
from core.registry import PipelineRegistry
from core.scripts import Scripts
from core.settings import Settings
from core.state_diff import compare
from core.store import BatchStore
from tests.conftest import PrivateRedis, eventually
from tests.helpers import AUTH, api_client, api_settings, spec, spec_body
from tests.test_consumers_support import Deployer, committed, options, unique

FILTERS: list[dict[str, str]] = [{}, {"state": "running"}, {"state": "scheduled"},
                                 {"state": "stop"}, {"outcome": "failed"},
                                 {"outcome": "completed"}]


async def _end(settings: Settings, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(await partitions_of(consumer, topic))
        return sum(ends.values())
    finally:
        await consumer.stop()


async def _all_consumed(settings: Settings) -> None:
    async def done() -> bool:
        return all([
            await committed(settings, settings.group_events, settings.topic_events)
            >= await _end(settings, settings.topic_events),
            await committed(settings, settings.group_commands, settings.topic_commands)
            >= await _end(settings, settings.topic_commands)])
    await eventually(done, timeout=30, interval=0.2)


# What may differ: `updated_at` (issue 12's allowance) and an error's `request_id` (each
# request's own).
IGNORED = frozenset({"updated_at", "request_id"})


def _without_updated_at(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_updated_at(v) for k, v in value.items() if k not in IGNORED}
    if isinstance(value, list | tuple):
        return [_without_updated_at(v) for v in value]
    return value


async def _answers(settings: Settings, batches: dict[str, list[str]]) -> dict[str, Any]:
    """Every GET by id, every latest, every page of every filtered list, every pipeline."""
    out: dict[str, Any] = {}
    async with api_client(settings) as api:  # a fresh process: nothing cached from before
        async def get(path: str, **params: str) -> tuple[int, Any]:
            resp = await api.get(path, headers=AUTH, params=params)
            return resp.status, await resp.json()

        for pipeline_id, ids in batches.items():
            for batch_id in ids:
                out[f"get {batch_id}"] = await get(f"/api/v1/batches/{pipeline_id}/{batch_id}")
            out[f"latest {pipeline_id}"] = await get(f"/api/v1/batches/{pipeline_id}")
            out[f"pipeline {pipeline_id}"] = await get(f"/api/v1/pipelines/{pipeline_id}")
            for where in FILTERS:
                token: str | None = None
                for n in range(20):
                    params = {**where, "limit": "2", **({"token": token} if token else {})}
                    status, body = await get(f"/api/v1/batches/{pipeline_id}/", **params)
                    out[f"list {pipeline_id} {where} page {n}"] = (status, body)
                    token = body.get("token") if status == 200 else None
                    if not token:
                        break
        out["pipelines"] = await get("/api/v1/pipelines/")
    return cast(dict[str, Any], _without_updated_at(out))


async def test_redis_rebuilt_from_kafka_answers_as_before(
        topics: Settings, private_redis: PrivateRedis) -> None:
    # A redis-server of this test only: a rebuild needs a database nobody else writes to.
    topics = topics.model_copy(update={"redis_url": private_redis.url})
    settings = api_settings(topics)
    redis = await open_redis(topics)
    deployer = Deployer(topics)  # an idle pool: flow runs wait, the test plays the events
    batches: dict[str, list[str]] = {"p-ra": [], "p-rb": []}
    name = unique("rebuild")
    producer = await open_producer(topics)

    async def send(batch_id: str, pipeline_id: str, **fields: Any) -> None:
        event = Event(batch_id=batch_id, pipeline_id=pipeline_id, **fields)
        await producer.send_and_wait(topics.topic_events, event.encode(), key=batch_id.encode())

    try:
        async with api_client(settings) as api:
            for pipeline_id, version in (("p-ra", "1"), ("p-ra", "2"), ("p-rb", "1")):
                # A name of the test's own: its deployer makes `run-pipeline/<name>` on an
                # idle pool, and must not take over the stack's own pipelines'.
                resp = await api.put(f"/api/v1/pipelines/{pipeline_id}", headers=AUTH,
                                     json=spec_body(name=name, version=version))
                assert resp.status == 201
            for pipeline_id, count in (("p-ra", 6), ("p-rb", 2)):
                for _ in range(count):
                    resp = await api.post(f"/api/v1/batches/{pipeline_id}", headers=AUTH)
                    assert resp.status == 200
                    batches[pipeline_id].append((await resp.json())["item"])
            a, b = batches["p-ra"], batches["p-rb"]
            commands = CommandsConsumer(topics, options(), ensure=deployer.ensure)
            events = EventsConsumer(topics, options())
            async with serving([commands, events], topics, 5.0):
                async def scheduled() -> bool:
                    for pipeline_id, ids in batches.items():
                        for batch_id in ids:
                            resp = await api.get(f"/api/v1/batches/{pipeline_id}/{batch_id}",
                                                 headers=AUTH)
                            if (await resp.json())["state"]["state"] != "scheduled":
                                return False
                    return True
                await eventually(scheduled, timeout=60, interval=0.2)
                # a[0], a[3], b[0] running with offsets; a[1] completed, a[2] failed;
                # a[4] deleted; a[5] and b[1] stay scheduled.
                for batch_id, pipeline_id in ((a[0], "p-ra"), (a[3], "p-ra"), (b[0], "p-rb")):
                    await send(batch_id, pipeline_id, type="batch.state", event_id=f"r-{batch_id}",
                               state="running")
                    await send(batch_id, pipeline_id, type="step.state", event_id=f"s-{batch_id}",
                               step="extract", state="running")
                    await send(batch_id, pipeline_id, type="step.offsets", step="extract",
                               offsets={"0": 7, "1": 3})
                await send(a[1], "p-ra", type="batch.state", event_id="stop-1", state="stop",
                           outcome="completed", ts=1.0)
                await send(a[2], "p-ra", type="batch.state", event_id="stop-2", state="stop",
                           outcome="failed", reason="boom", ts=1.0)
                resp = await api.delete(f"/api/v1/batches/p-ra/{a[4]}", headers=AUTH)
                assert resp.status in (200, 202, 204)
                await _all_consumed(topics)
        before = await _answers(settings, batches)
        assert before[f"get {a[4]}"][0] == 404
        assert before[f"get {a[2]}"][1]["reason"] == "boom"

        await redis.flushdb()
        assert (await _answers(settings, batches))[f"latest {'p-ra'}"][0] == 404
        restored = await rebuild(topics)
        assert (restored.pipelines, restored.versions) == (2, 3)
        after = await _answers(settings, batches)
        assert after == before
        # The deleted batch's clean-up is queued again (its queue was in Redis too).
        assert restored.hidden == 1
        assert await redis.zrange(keys.CLEANUP_DUE, 0, -1) == [member("delete", "p-ra", a[4])]
        try:
            await rebuild(topics)  # a database holding data is refused
            raise AssertionError("rebuild into a full database was not refused")
        except NotEmpty:
            pass

        # The consumers take over where their groups left off.
        async with api_client(settings) as api:
            events = EventsConsumer(topics, options())
            async with serving([events], topics, 5.0):
                await send(a[3], "p-ra", type="step.offsets", step="extract", offsets={"0": 99})
                await send(a[4], "p-ra", type="batch.state", event_id="late", state="running")
                await send(b[0], "p-rb", type="batch.state", event_id="stop-b0", state="stop",
                           outcome="completed", ts=2.0)

                async def moved() -> bool:
                    one = await (await api.get(f"/api/v1/batches/p-ra/{a[3]}",
                                               headers=AUTH)).json()
                    two = await (await api.get(f"/api/v1/batches/p-rb/{b[0]}",
                                               headers=AUTH)).json()
                    return bool(one["state"]["steps"]["extract"]["offsets"] == {"0": 99, "1": 3}
                                and two["state"]["state"] == "stop")
                await eventually(moved, timeout=20, interval=0.1)
            gone = await api.get(f"/api/v1/batches/p-ra/{a[4]}", headers=AUTH)
            assert gone.status == 404
            # New batches continue the pipeline's order: newest first, before the old newest.
            resp = await api.post("/api/v1/batches/p-ra", headers=AUTH)
            new_id = (await resp.json())["item"]
            page = await (await api.get("/api/v1/batches/p-ra/", headers=AUTH,
                                        params={"limit": "2"})).json()
            assert list(page["items"]) == [new_id, a[5]]  # items: id -> batch, in order
    finally:
        await producer.stop()
        await deployer.cleanup([i for ids in batches.values() for i in ids])
        await redis.aclose()


async def test_state_from_before_the_records_is_exported_then_rebuilt(
        topics: Settings, private_redis: PrivateRedis) -> None:
    topics = topics.model_copy(update={"redis_url": private_redis.url})
    settings = api_settings(topics)
    redis = await open_redis(topics)
    try:
        # Written straight to Redis, as code from before the durable records left it.
        scripts = Scripts(redis)
        registry = PipelineRegistry(redis, scripts)
        store = BatchStore.from_settings(redis, topics, scripts)
        for version in ("1", "2"):
            await registry.register("p-old", spec(version=version))
        ids = [new_batch_id() for _ in range(3)]
        for batch_id in ids:
            await store.create("p-old", batch_id, spec(version="2"))
        await store.apply([Event("batch.state", ids[0], "p-old", event_id="x", state="stop",
                                 outcome="failed", reason="old", ts=1.0)])
        before = await _answers(settings, {"p-old": ids})

        async with contextlib.AsyncExitStack() as scope:
            assert await export(await open_clients(scope, topics), topics) == (2, 3)
        # A dry run: rebuilt into another database, compared with the live one.
        dry = private_redis.url.rsplit("/", 1)[0] + "/1"
        assert await run(["--redis-url", dry, "--compare-with", private_redis.url], topics) == 0
        await redis.hset(keys.batch("p-old", ids[1]), "state", "running")
        copy = await open_redis(topics.model_copy(update={"redis_url": dry}))
        try:
            diff = await compare(redis, copy)
        finally:
            await copy.aclose()
        assert (diff.batches, diff.differing, diff.missing) == (3, [f"p-old/{ids[1]}: state"], [])
        await redis.flushdb()
        await rebuild(topics)
        assert await _answers(settings, {"p-old": ids}) == before
    finally:
        await redis.aclose()
