"""The pipeline registry's writes against faults and odd input, on the real Kafka and Redis:
a version's durable record (the pipelines topic a rebuild reads) is written before Redis
registers it, so a PUT answered 503 or 413 registers nothing and no batch runs a version a
rebuild would not know; a retry repairs what a first attempt cut short; step configs are
checked as the published JSON Schema says."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import orjson
from aiokafka.errors import KafkaTimeoutError
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from consumers.rebuild import rebuild
from core.codec import Event
from core.models import PipelineSpec
from core.registry import PipelineRegistry
from core.scripts import Scripts
from core.settings import Settings
from core.store import BatchStore
from service.appkeys import COMMANDS, PRODUCER, REGISTRY
from tests.helpers import AUTH, api_client, api_settings, spec_body


async def test_a_put_answered_503_registers_nothing_so_no_batch_runs_a_version_a_rebuild_loses(
        topics: Settings, redis: Redis) -> None:
    """PUT v2 whose record the pipelines topic did not confirm answered 503 but left v2
    registered: GET showed it as latest and a POST ran a batch on it, which a rebuild of
    Redis from Kafka (no v2 there) then lost. Now the 503 registers nothing: the POST runs
    v1 and the batch survives the rebuild."""
    settings = api_settings(topics)
    async with api_client(settings) as api:
        resp = await api.put("/api/v1/pipelines/p", json=spec_body(version="1"), headers=AUTH)
        assert resp.status == 201
        producer = api.app[PRODUCER]
        real_send = producer.send

        async def unconfirmed(topic: str, *args: Any, **kwargs: Any) -> Any:
            if topic == settings.topic_pipelines:
                raise KafkaTimeoutError()  # the broker did not confirm the record in time
            return await real_send(topic, *args, **kwargs)

        producer.send = unconfirmed
        try:
            resp = await api.put("/api/v1/pipelines/p", json=spec_body(version="2"),
                                 headers=AUTH)
            assert resp.status == 503
        finally:
            del producer.send  # the class's method again
        pipeline_before = await (await api.get("/api/v1/pipelines/p", headers=AUTH)).json()
        resp = await api.post("/api/v1/batches/p", headers=AUTH)
        assert resp.status == 200, await resp.text()
        batch_id = (await resp.json())["item"]
        batch_before = await (await api.get(f"/api/v1/batches/p/{batch_id}",
                                            headers=AUTH)).json()

    await redis.flushdb()  # Redis lost; rebuilt from the topics (no consumer ran meanwhile)
    await rebuild(topics, force=True)

    async with api_client(settings) as api:
        resp = await api.get(f"/api/v1/batches/p/{batch_id}", headers=AUTH)
        # The batch was accepted (200): it must survive the rebuild, on the version it ran.
        assert resp.status == 200, (
            f"accepted batch {batch_id} (version {batch_before.get('pipeline_version')}) lost "
            f"by the rebuild: {resp.status} {await resp.text()}")
        pipeline_after = await (await api.get("/api/v1/pipelines/p", headers=AUTH)).json()
        assert pipeline_after["latest"] == pipeline_before["latest"]


class _SaddFails:
    """The registry's Redis client, whose connection drops on SADD (after the script ran)."""

    def __init__(self, real: Redis) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    async def sadd(self, *_args: Any) -> int:
        raise RedisConnectionError("connection lost")


async def test_a_pipeline_whose_first_put_failed_after_its_script_is_listed_after_the_retry(
        topics: Settings, redis: Redis) -> None:
    """PUT p: the registration script adds the version, then the connection drops before the
    SADD to the pipelines set -> an error. The client's retry was `unchanged` (200) and ran
    no SADD: GET /pipelines/p answered it, the list of pipelines never showed p."""
    settings = api_settings(topics)
    async with api_client(settings) as api:
        registry = api.app[REGISTRY]
        real = registry.redis
        registry.redis = _SaddFails(real)
        try:
            resp = await api.put("/api/v1/pipelines/p", json=spec_body(), headers=AUTH)
            assert resp.status >= 500
            assert resp.content_type == "application/json"
        finally:
            registry.redis = real
        resp = await api.put("/api/v1/pipelines/p", json=spec_body(), headers=AUTH)
        assert resp.status in (200, 201)
        assert (await api.get("/api/v1/pipelines/p", headers=AUTH)).status == 200
        listed = await (await api.get("/api/v1/pipelines/", headers=AUTH)).json()
        assert "p" in listed["items"], f"p registered but not listed: {sorted(listed['items'])}"


async def test_a_put_refused_503_while_kafka_is_known_down_registers_nothing(
        topics: Settings, redis: Redis) -> None:
    """While Kafka is known down every write answers 503 at once, and a 503 changes nothing
    (a 503 POST leaves no batch). A PUT registered its version first: GET showed it as
    latest and the next POST ran it, with no record of it on the pipelines topic."""
    settings = api_settings(topics)
    async with api_client(settings) as api:
        resp = await api.put("/api/v1/pipelines/p", json=spec_body(version="1"), headers=AUTH)
        assert resp.status == 201
        sender = api.app[COMMANDS]
        sender.available = False  # as after a send met an unreachable Kafka
        try:
            resp = await api.put("/api/v1/pipelines/p", json=spec_body(version="2"),
                                 headers=AUTH)
            assert resp.status == 503
        finally:
            sender.available = True
        pipeline = await (await api.get("/api/v1/pipelines/p", headers=AUTH)).json()
        assert pipeline["latest"] == "1", (
            f"a PUT answered 503 registered its version: latest {pipeline['latest']}, "
            f"versions {[v['version'] for v in pipeline['versions']]}")


async def test_a_step_config_the_published_schema_refuses_is_refused(
        topics: Settings, redis: Redis) -> None:
    """GET /api/v1/steps publishes each step's config JSON Schema, "checked at registration
    and at run": `rows` is an integer. `"20"` or `true` was registered as given (the run
    read 20 / 1 through pydantic's lax coercion): 400 now."""
    settings = api_settings(topics)
    async with api_client(settings) as api:
        steps = await (await api.get("/api/v1/steps", headers=AUTH)).json()
        rows = steps["items"]["sales.extract"]["config_schema"]["properties"]["rows"]
        assert rows["type"] == "integer"
        answers = {}
        for n, value in enumerate(["20", True]):
            body = spec_body(version=str(n + 1), steps=("extract",))
            body["steps"][0]["config"] = {"rows": value}
            resp = await api.put("/api/v1/pipelines/p", json=body, headers=AUTH)
            answers[repr(value)] = resp.status
        assert answers == {"'20'": 400, "True": 400}, answers


async def test_a_definition_too_large_for_its_record_answers_413_and_registers_nothing(
        topics: Settings, redis: Redis) -> None:
    """A definition under the body limit (1 MiB) whose pipelines-topic record passes what the
    broker takes (1 MB) was refused by Kafka on every try: 503 ("retry later") each time,
    and each time registered and runnable in Redis. Now 413, and nothing registered."""
    settings = api_settings(topics)
    body = spec_body(version="1", steps=("extract",))
    body["steps"][0]["config"] = {"fail_at": ""}  # any string is a valid fail_at
    # Just under the body limit (1 MiB): the record adds its pipeline id and order.
    size = len(orjson.dumps(body))
    body["steps"][0]["config"]["fail_at"] = "x" * (settings.max_body_bytes - 8 - size)
    async with api_client(settings) as api:
        statuses = []
        for _ in range(2):  # the client retries as a 503 tells it to
            resp = await api.put("/api/v1/pipelines/p", data=io.BytesIO(orjson.dumps(body)),
                                 headers={**AUTH, "Content-Type": "application/json"})
            assert resp.content_type == "application/json"
            statuses.append(resp.status)
        listed = await api.get("/api/v1/pipelines/p", headers=AUTH)
        assert (statuses, listed.status) == ([413, 413], 404), (
            f"PUT answered {statuses}; GET of the pipeline then {listed.status}")


async def test_concurrent_puts_leave_the_topic_agreeing_with_redis_on_order_and_bodies(
        topics: Settings, redis: Redis) -> None:
    """PUTs racing each other each take their place in the order from what they read before
    registering: the ones that lost the race write their record again with the place Redis
    gave them, and a PUT of a version another registered first (409) writes the winner's
    record again, so a rebuild from the topic gives the versions, order and bodies Redis had."""
    settings = api_settings(topics)
    async with api_client(settings) as api:
        puts = [api.put("/api/v1/pipelines/p", json=spec_body(version=str(n)), headers=AUTH)
                for n in range(1, 7)]
        rival = spec_body(version="3")
        rival["steps"][0]["config"] = {"rows": 7}
        puts.append(api.put("/api/v1/pipelines/p", json=rival, headers=AUTH))
        statuses = sorted([r.status for r in await asyncio.gather(*puts)])
        assert statuses == [201] * 6 + [409], statuses
        before = await (await api.get("/api/v1/pipelines/p", headers=AUTH)).json()
    await redis.flushdb()
    await rebuild(topics, force=True)
    async with api_client(settings) as api:
        after = await (await api.get("/api/v1/pipelines/p", headers=AUTH)).json()
    assert after == before


def _spec_with(rows: Any, version: str = "1") -> dict[str, Any]:
    return {"name": "sales-pipeline", "version": version, "steps": [
        {"name": "extract", "uses": "sales.extract", "config": {"rows": rows, "partitions": 2}},
        {"name": "transform", "uses": "sales.transform", "config": {}},
        {"name": "load", "uses": "sales.load", "config": {}}]}


async def test_a_lost_race_whose_rewrite_failed_is_repaired_by_the_losers_retry(
        topics: Settings, redis: Redis) -> None:
    """PUT v2 {Y} reads the registry (v2 not there), then PUT v2 {X} completes (201: its
    record, then Redis). Y's record lands after X's; Y's registration is a CONFLICT and the
    re-write of X's record is not confirmed: 503. The topic's last v2 record was Y's while
    Redis held X, and Y's retry (409 before any write) left it so: a rebuild showed v2 as Y,
    a definition that was refused. The retry now writes X's record again."""
    settings = api_settings(topics)
    x = _spec_with(800, version="2")
    y = _spec_with(900, version="2")
    async with api_client(settings) as api:
        assert (await api.put("/api/v1/pipelines/r", json=_spec_with(700), headers=AUTH)
                ).status == 201
        producer = api.app[PRODUCER]
        real_send = producer.send
        state = {"n": 0}

        async def send(topic: str, value: bytes, *args: Any, **kwargs: Any) -> Any:
            if topic == settings.topic_pipelines and state["n"] == 0 and b'"rows":900' in value:
                state["n"] = 1
                # The concurrent PUT {X} runs to its end between Y's read and Y's record.
                resp = await api.put("/api/v1/pipelines/r", json=x, headers=AUTH)
                assert resp.status == 201, await resp.text()
                state["n"] = 2
                return await real_send(topic, value, *args, **kwargs)
            if topic == settings.topic_pipelines and state["n"] == 2 and b'"rows":800' in value:
                state["n"] = 3
                raise KafkaTimeoutError()  # Y's repairing re-write of X: not confirmed
            return await real_send(topic, value, *args, **kwargs)

        producer.send = send
        try:
            resp = await api.put("/api/v1/pipelines/r", json=y, headers=AUTH)
        finally:
            del producer.send
        assert state["n"] == 3 and resp.status == 503, (state, resp.status)
        # Y's client retries: told 409 (X holds v2), and that retry should leave the topic
        # agreeing with Redis.
        resp = await api.put("/api/v1/pipelines/r", json=y, headers=AUTH)
        assert resp.status == 409
        held = await (await api.get("/api/v1/pipelines/r", headers=AUTH)).json()
    await redis.flushdb()
    await rebuild(topics, force=True)
    async with api_client(settings) as api:
        rebuilt = await (await api.get("/api/v1/pipelines/r", headers=AUTH)).json()
    assert rebuilt["versions"] == held["versions"]


async def test_a_pipeline_registered_before_the_strict_check_still_runs(
        topics: Settings, redis: Redis) -> None:
    """A version the previous API registered with `"rows": 800.0` (lax validation took it;
    the worker's model reads it as 800): a strict check of the whole merged config made a
    run overriding anything (even another step's fail_at), its failed batch's resume with
    no body, and the client's retry of its own PUT 400s naming a registered value nobody
    sent with the request. Only the request's own values are checked for their JSON type."""
    registry = PipelineRegistry(redis, Scripts(redis))
    # As the previous version's PUT left it in Redis (its check was model_validate, lax).
    await registry.register("old", PipelineSpec.model_validate(_spec_with(800.0)))
    async with api_client(api_settings(topics)) as api:
        resp = await api.post("/api/v1/batches/old", headers=AUTH)
        assert resp.status == 200, await resp.text()  # no override: not checked
        failed = (await resp.json())["item"]
        store = BatchStore(redis, Scripts(redis), token_secret=b"t")
        await store.apply([Event("batch.state", failed, "old", event_id=f"{failed}-1",
                                 state="stop", outcome="failed", reason="on purpose")])
        # Its resume, with no body at all: the batch's own recorded config is refused.
        resp = await api.post(f"/api/v1/batches/old/{failed}/resume", headers=AUTH)
        assert resp.status == 200, await resp.text()
        resp = await api.post("/api/v1/batches/old", headers=AUTH,
                              json={"config": {"load": {"fail_at": None}}})
        body = await resp.json()
        assert resp.status == 200, body
        # The client's retry of the very PUT that registered it: unchanged, 200.
        resp = await api.put("/api/v1/pipelines/old", json=_spec_with(800.0), headers=AUTH)
        assert resp.status == 200, await resp.text()


async def test_an_integral_number_is_an_integer_as_the_published_schema_says(
        topics: Settings, redis: Redis) -> None:
    """GET /api/v1/steps publishes `rows` as JSON Schema `"type": "integer"`, which 800.0
    satisfies (JSON Schema: an integer is a number with a zero fractional part; Python's
    json.dumps(800.0) writes it so); 800.5 does not."""
    async with api_client(api_settings(topics)) as api:
        steps = await (await api.get("/api/v1/steps", headers=AUTH)).json()
        rows = steps["items"]["sales.extract"]["config_schema"]["properties"]["rows"]
        assert rows["type"] == "integer"
        resp = await api.put("/api/v1/pipelines/p-int", json=_spec_with(800.0), headers=AUTH)
        assert resp.status == 201, await resp.text()
        resp = await api.put("/api/v1/pipelines/p-int", json=_spec_with(800.5, version="2"),
                             headers=AUTH)
        assert resp.status == 400, await resp.text()
