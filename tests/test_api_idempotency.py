"""Idempotency-Key as a protocol, on the real Redis and Kafka (a proxy in front of the shared
broker makes the first attempt slow or failing): `pending` until the run command is queued,
then `committed`; a duplicate waits or gets `409 in_progress`; a failed attempt releases the
key; the request is compared as sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core import keys
from core.codec import decode_command
from core.settings import Settings
from service.appkeys import COMMANDS
from tests.conftest import eventually
from tests.helpers import AUTH, api_client, api_settings, read_topic, spec_body
from tests.write_faults_proxy import KafkaProxy

Client = TestClient[Any, Any]
KEY = {**AUTH, "Idempotency-Key": "order-42"}


@pytest.fixture
async def api(topics: Settings, redis: Redis, proxy: KafkaProxy) -> AsyncIterator[Client]:
    async with api_client(api_settings(topics, kafka_bootstrap=proxy.address)) as client:
        for pipeline in ("p", "other"):
            response = await client.put(f"/api/v1/pipelines/{pipeline}", json=spec_body(),
                                        headers=AUTH)
            assert response.status == 201
        yield client


async def post(api: Client, path: str = "/api/v1/batches/p", **kwargs: Any) -> tuple[int, Any]:
    response = await api.post(path, headers=kwargs.pop("headers", KEY), **kwargs)
    assert response.content_type == "application/json"
    return response.status, await response.json()


async def exists(api: Client, batch_id: str) -> bool:
    response = await api.get(f"/api/v1/batches/p/{batch_id}", headers=AUTH)
    return response.status == 200


async def test_a_retry_while_the_first_post_waits_on_kafka_never_gets_a_dead_batch(
        api: Client, proxy: KafkaProxy) -> None:
    proxy.mute()  # the first attempt waits for an answer that never comes, then fails
    first = asyncio.create_task(post(api))
    await asyncio.sleep(0.5)
    status, body = await post(api)
    # The first attempt is still pending: no batch id of it may be handed out yet.
    assert status == 409 and body["error"]["code"] == "in_progress", body
    assert (await first)[0] == 503
    proxy.restore()

    async def accepted() -> Any:
        status, body = await post(api)
        return body["item"] if status == 200 else None

    batch_id = await eventually(accepted, timeout=30, interval=0.2)
    assert await exists(api, str(batch_id)), "the key's batch exists"
    status, body = await post(api)
    assert (status, body["item"]) == (200, batch_id)


async def test_a_failed_creation_releases_the_key(api: Client, redis: Redis) -> None:
    # A sequence counter that is not a number: creating the batch fails inside Redis
    # before it writes anything.
    await redis.set(keys.batch_seq("p"), "not a number")
    status, _ = await post(api)
    assert status >= 400
    await redis.delete(keys.batch_seq("p"))
    status, body = await post(api)
    assert status == 200
    assert await exists(api, body["item"]), "the retry created a batch that exists"


async def test_the_request_is_compared_as_sent(api: Client, topics: Settings) -> None:
    status, body = await post(api)
    assert status == 200
    batch_id = body["item"]
    v2 = spec_body(version="2")
    assert (await api.put("/api/v1/pipelines/p", json=v2, headers=AUTH)).status == 201
    # The same request (no version: "latest"), though latest is now another version.
    assert await post(api) == (200, {"item": batch_id})

    status, body = await post(api, params={"pipeline_version": "2"})
    assert status == 409 and body["error"]["code"] == "conflict"
    assert body["error"]["details"]["differs"] == {
        "pipeline_version": {"earlier": "latest", "now": "2"}}
    assert "pipeline_version" in body["error"]["message"]

    status, body = await post(api, "/api/v1/batches/other")
    assert status == 409
    assert set(body["error"]["details"]["differs"]) == {"pipeline_id"}

    status, body = await post(api, json={"config": {"extract": {"rows": 5}}})
    assert status == 409
    assert body["error"]["details"]["differs"] == {
        "body": {"earlier": "", "now": '{"extract":{"rows":5}}'}}

    def runs(records: list[Any]) -> list[str]:
        return [c.batch_id for r in records if (c := decode_command(r.value)).type == "run"]

    records = await read_topic(topics, topics.topic_commands, lambda rs: bool(runs(rs)))
    assert runs(records) == [batch_id]


async def test_concurrent_duplicates_get_one_batch(api: Client) -> None:
    results = await asyncio.gather(*(post(api) for _ in range(10)))
    assert {status for status, _ in results} == {200}
    assert len({body["item"] for _, body in results}) == 1
    page = await (await api.get("/api/v1/batches/p/", headers=AUTH)).json()
    assert len(page["items"]) == 1


@pytest.mark.parametrize("value", [b"caf\xc3\xa9", b"\xff\xfe", b"x" * 257])
async def test_a_bad_idempotency_key_is_a_400(api: Client, redis: Redis, value: bytes) -> None:
    reader, writer = await asyncio.open_connection(api.host, api.port)
    token = AUTH["Authorization"].encode()
    writer.write(b"POST /api/v1/batches/p HTTP/1.1\r\nHost: x\r\nAuthorization: " + token +
                 b"\r\nIdempotency-Key: " + value + b"\r\nContent-Length: 0\r\n"
                 b"Connection: close\r\n\r\n")
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert b'"bad_request"' in body and b"Idempotency-Key" in body
    assert await redis.keys("dhub:idem:*") == []


async def test_a_replay_after_the_batch_was_deleted_is_a_409_not_a_dead_id(api: Client) -> None:
    status, body = await post(api)
    assert status == 200
    batch_id = body["item"]
    deleted = await api.delete(f"/api/v1/batches/p/{batch_id}", headers=AUTH)
    assert deleted.status == 200
    status, body = await post(api)
    assert status == 409 and body["error"]["code"] == "conflict", body
    assert body["error"]["details"]["batch_id"] == batch_id
    assert not await exists(api, batch_id)


async def test_a_replay_answers_its_batch_though_the_latest_version_now_refuses_its_body(
        api: Client, topics: Settings, proxy: KafkaProxy) -> None:
    body = {"config": {"extract": {"rows": 1}}}
    status, first = await post(api, json=body)
    assert status == 200, first
    # A new latest version without that step; the first answer was lost meanwhile, and the
    # retry reaches another API process (one that has only seen v2 as the latest).
    v2 = {"name": "sales-pipeline", "version": "2",
          "steps": [{"name": "only", "uses": "sales.extract", "config": {}}]}
    assert (await api.put("/api/v1/pipelines/p", json=v2, headers=AUTH)).status == 201
    async with api_client(api_settings(topics, kafka_bootstrap=proxy.address)) as other:
        assert await post(other, json=body) == (200, first)
        # A new key with the same body is refused by the new latest, as it should be.
        fresh = {**AUTH, "Idempotency-Key": "order-43"}
        status, refused = await post(other, json=body, headers=fresh)
        assert status == 400, refused
    assert await exists(api, first["item"])


async def test_a_replay_answers_its_batch_while_kafka_is_known_down(
        api: Client, proxy: KafkaProxy) -> None:
    status, first = await post(api)
    assert status == 200
    api.app[COMMANDS].available = False  # as after a send met an unreachable Kafka
    try:
        assert await post(api) == (200, first)
        assert (await post(api, headers={**AUTH, "Idempotency-Key": "order-43"}))[0] == 503
    finally:
        api.app[COMMANDS].available = True


async def test_a_resume_replay_answers_its_batch_after_the_old_one_was_deleted(
        api: Client, redis: Redis) -> None:
    status, old = await post(api, headers=AUTH)
    assert status == 200
    # It failed, as the events consumer records it.
    await redis.hset(keys.batch("p", old["item"]), mapping={"state": "stop", "outcome": "failed"})
    resume = f"/api/v1/batches/p/{old['item']}/resume"
    status, new = await post(api, resume)
    assert status == 200, new
    # The client's answer was lost; meanwhile the resume ran (it took the old batch's data
    # over: until it stops the old batch cannot be deleted), and the old batch is deleted.
    await redis.hset(keys.batch("p", new["item"]), mapping={"state": "stop",
                                                             "outcome": "completed"})
    assert (await api.delete(f"/api/v1/batches/p/{old['item']}", headers=AUTH)).status == 200
    assert await post(api, resume) == (200, new)
    # Another key, or another body, is a new request: the old batch is gone for it.
    assert (await post(api, resume, headers={**AUTH, "Idempotency-Key": "order-43"}))[0] == 404
    assert (await post(api, resume, json={"config": {"load": {"x": 1}}}))[0] == 404
    assert await exists(api, new["item"])
