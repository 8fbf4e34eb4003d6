"""What a batch runs with, against what the API answered, on the real Redis and Kafka: a
config that no run command can carry (its batch's record on the commands topic would pass
one Kafka record's limit) is refused as too large (413) with nothing written, not answered
"retry later" (503) on every try, for a POST's overrides, a resume's and a registered
definition's own config."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core import keys
from core.codec import Event
from core.scripts import Scripts
from core.settings import Settings
from core.store import BatchStore
from tests.helpers import AUTH, api_client, api_settings

Client = TestClient[Any, Any]
P = "p"
SPEC: dict[str, Any] = {"name": "sales-pipeline", "version": "1", "steps": [
    {"name": "extract", "uses": "sales.extract", "config": {"rows": 100, "seed": 7}},
    {"name": "transform", "uses": "sales.transform"},
    {"name": "load", "uses": "sales.load"}]}
JSON = {**AUTH, "Content-Type": "application/json"}
# 800 KB of body (each `"` is sent as `\"`), under the 1 MiB body limit; the batch's `config`
# field holds it as written, and the run command quotes that text again: 1.6 MB.
QUOTES = '"' * 400_000


@pytest.fixture
async def api(topics: Settings, redis: Redis) -> AsyncIterator[Client]:
    async with api_client(api_settings(topics)) as client:
        response = await client.put(f"/api/v1/pipelines/{P}", json=SPEC, headers=AUTH)
        assert response.status == 201
        yield client


async def batches(redis: Redis) -> int:
    return int(await redis.zcard(keys.batch_index(P)))


@pytest.mark.parametrize("headers", [JSON, {**JSON, "Idempotency-Key": "k-big"}])
async def test_overrides_no_run_command_can_carry_are_a_413(
        api: Client, redis: Redis, headers: dict[str, str]) -> None:
    body = orjson.dumps({"config": {"transform": {"fail_at": QUOTES}}})
    assert len(body) < 1 << 20
    for _ in range(2):  # a retry is refused alike: nothing will ever make it fit
        response = await api.post(f"/api/v1/batches/{P}", data=body, headers=headers)
        answer = await response.json()
        assert response.status == 413, answer
        assert answer["error"]["code"] == "payload_too_large"
    assert await batches(redis) == 0
    # One that fits still runs, with that key's key free.
    response = await api.post(f"/api/v1/batches/{P}", headers=headers,
                              data=orjson.dumps({"config": {"transform": {"fail_at": "x"}}}))
    assert response.status == 200, await response.text()


async def test_a_definition_whose_runs_no_command_can_carry_is_a_413(
        api: Client, redis: Redis) -> None:
    # Its own record on the pipelines topic fits (the quotes written once, as `\"`); each
    # batch's run command would carry the config quoted once more, and every POST of it
    # would answer 503.
    big = {**SPEC, "version": "2", "steps": [
        {"name": "transform", "uses": "sales.transform", "config": {"fail_at": '"' * 300_000}}]}
    response = await api.put(f"/api/v1/pipelines/{P}", json=big, headers=AUTH)
    answer = await response.json()
    assert response.status == 413, answer
    shown = await (await api.get(f"/api/v1/pipelines/{P}", headers=AUTH)).json()
    assert shown["latest"] == "1" and len(shown["versions"]) == 1
    response = await api.post(f"/api/v1/batches/{P}", headers=AUTH)
    assert response.status == 200, await response.text()


async def test_a_resume_no_run_command_can_carry_is_a_413(api: Client, redis: Redis) -> None:
    response = await api.post(f"/api/v1/batches/{P}", headers=AUTH)
    assert response.status == 200
    old: str = (await response.json())["item"]
    store = BatchStore(redis, Scripts(redis), token_secret=b"t")
    await store.apply([Event("batch.state", old, P, event_id=f"{old}-0", state="running"),
                       Event("batch.state", old, P, event_id=f"{old}-1", state="stop",
                             outcome="failed", reason="on purpose")])
    body = orjson.dumps({"config": {"transform": {"fail_at": QUOTES}}})
    response = await api.post(f"/api/v1/batches/{P}/{old}/resume", data=body, headers=JSON)
    answer = await response.json()
    assert response.status == 413, answer
    assert await batches(redis) == 1


V2 = {**SPEC, "version": "2", "steps": [*SPEC["steps"],
                                        {"name": "reload", "uses": "sales.load"}]}


async def post_run(api: Client, body: Any) -> tuple[int, Any]:
    response = await api.post(f"/api/v1/batches/{P}", json=body, headers=AUTH)
    return response.status, await response.json()


@pytest.mark.parametrize("where", ["this API", "another API process"])
async def test_overrides_for_a_step_only_the_new_latest_has_run_it(
        api: Client, redis: Redis, where: str) -> None:
    status, answer = await post_run(api, None)  # this process now knows 1 as the latest
    assert status == 200, answer
    if where == "this API":
        response = await api.put(f"/api/v1/pipelines/{P}", json=V2, headers=AUTH)
        assert response.status == 201
    else:
        from core.models import PipelineSpec
        from core.registry import PipelineRegistry

        await PipelineRegistry(redis, Scripts(redis)).register(
            P, PipelineSpec.model_validate(V2))
    # Refused against version 1 ("no step named reload"), which is not the latest any more.
    status, answer = await post_run(api, {"config": {"reload": {"partitions": 2}}})
    assert status == 200, answer
    shown = await (await api.get(f"/api/v1/batches/{P}/{answer['item']}", headers=AUTH)).json()
    assert shown["pipeline_version"] == "2"
    assert shown["config"]["reload"] == {"partitions": 2}
    # What only version 1 would take is refused now, naming version 2's steps.
    status, answer = await post_run(api, {"config": {"nope": {"rows": 1}}})
    assert status == 400 and "reload" in answer["error"]["details"]["problems"][0]["msg"]


async def test_a_put_equal_in_value_but_not_as_registered_writes_no_record_of_itself(
        topics: Settings, redis: Redis) -> None:
    """v1 holds `rows: 800`; a PUT of v1 with `rows: 800.0` is another definition to the
    registry (whose script compares the registered text: 409), but the API's own check
    compared the two as equal and wrote its record (800.0) before the registration found the
    conflict; the topic then said 800.0 until the repairing write of 800, and with that write
    not confirmed (503) a rebuild restored 800.0: a version GET never showed."""
    from aiokafka.errors import KafkaTimeoutError

    from consumers.rebuild import rebuild
    from service.appkeys import PRODUCER

    settings = api_settings(topics)
    v1 = {**SPEC, "steps": [{**SPEC["steps"][0], "config": {"rows": 800}}, *SPEC["steps"][1:]]}
    again = {**v1, "steps": [{**v1["steps"][0], "config": {"rows": 800.0}}, *v1["steps"][1:]]}
    async with api_client(settings) as api:
        assert (await api.put("/api/v1/pipelines/q", json=v1, headers=AUTH)).status == 201
        held = await (await api.get("/api/v1/pipelines/q", headers=AUTH)).json()
        producer = api.app[PRODUCER]
        real_send = producer.send_and_wait
        sent: list[bytes] = []

        async def send(topic: str, value: bytes, *args: Any, **kwargs: Any) -> Any:
            if topic == settings.topic_pipelines:
                sent.append(value)
                if len(sent) == 2:
                    raise KafkaTimeoutError()  # the second record of this PUT: not confirmed
            return await real_send(topic, value, *args, **kwargs)

        producer.send_and_wait = send
        try:
            response = await api.put("/api/v1/pipelines/q", json=again, headers=AUTH)
        finally:
            del producer.send_and_wait
        assert response.status in (409, 503), await response.text()
        assert not any(b'"rows":800.0' in value for value in sent), sent
    await redis.flushdb()
    await rebuild(topics, force=True)
    async with api_client(settings) as api:
        rebuilt = await (await api.get("/api/v1/pipelines/q", headers=AUTH)).json()
    assert rebuilt["versions"] == held["versions"]
