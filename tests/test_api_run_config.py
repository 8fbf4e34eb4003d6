"""Run-time config through the API on the real Redis and Kafka: `POST
/api/v1/batches/{pipeline_id}` with `{"config": {"<step>": {...}}}` runs the batch with the
overrides merged over the registered config (shown under `config`, queued with the run),
refuses what the steps' config models refuse (400, every problem named), and keeps a POST
without a body exactly as it was. The Idempotency-Key covers the body, compared by meaning."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core import keys
from core.settings import Settings
from tests.helpers import AUTH, api_client, api_settings

Client = TestClient[Any, Any]
SPEC = {"name": "sales-pipeline", "version": "1", "steps": [
    {"name": "extract", "uses": "sales.extract", "config": {"rows": 100, "seed": 7}},
    {"name": "transform", "uses": "sales.transform", "config": {"fail_at": "transform"}},
    {"name": "load", "uses": "sales.load"}]}
REGISTERED = {"extract": {"rows": 100, "seed": 7}, "transform": {"fail_at": "transform"},
              "load": {}}


@pytest.fixture
async def api(topics: Settings, redis: Redis) -> AsyncIterator[Client]:
    async with api_client(api_settings(topics)) as client:
        response = await client.put("/api/v1/pipelines/p", json=SPEC, headers=AUTH)
        assert response.status == 201
        yield client


async def run(api: Client, headers: dict[str, str] | None = None, **kwargs: Any
              ) -> tuple[int, Any]:
    response = await api.post("/api/v1/batches/p", headers=headers or AUTH, **kwargs)
    return response.status, await response.json()


async def batch(api: Client, batch_id: str) -> dict[str, Any]:
    response = await api.get(f"/api/v1/batches/p/{batch_id}", headers=AUTH)
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body


async def test_overrides_are_merged_over_the_registered_config_and_shown(api: Client) -> None:
    status, body = await run(api, json={"config": {"extract": {"rows": 5},
                                                   "transform": {"fail_at": None}}})
    assert status == 200, body
    shown = await batch(api, body["item"])
    assert shown["config"] == {"extract": {"rows": 5, "seed": 7}, "transform": {"fail_at": None},
                               "load": {}}
    # The contract's fields keep their names and places; the extra ones come after them.
    assert list(shown)[:11] == ["id", "name", "deployment", "state", "pipeline_id",
                                "pipeline_version", "created_at", "updated_at", "outcome",
                                "reason", "flow_run_id"]
    assert "resumed_from" not in shown


@pytest.mark.parametrize("body", [None, b"", b"  ", b"{}", b'{"config": {}}',
                                  b'{"config": {"load": {}}}'])
async def test_no_overrides_run_with_the_registered_config(api: Client, redis: Redis,
                                                           body: bytes | None) -> None:
    status, answer = await run(api, data=body)
    assert status == 200, answer
    assert (await batch(api, answer["item"]))["config"] == REGISTERED
    # Nothing but the batch and its place in the index is written: the fields are the ones
    # a POST without a body has always written, plus `config`.
    fields = await redis.hgetall(keys.batch("p", answer["item"]))
    assert set(fields) == {"id", "name", "deployment", "pipeline_id", "pipeline_version",
                           "state", "steps", "created_at", "updated_at", "rev", "seq",
                           "step:extract", "step:transform", "step:load", "config"}


@pytest.mark.parametrize(("body", "locs"), [
    ({"config": {"nope": {"rows": 1}}}, ["config.nope"]),
    ({"config": {"extract": {"rows": -1}, "load": {"partitions": 0}}},
     ["config.extract.rows", "config.load.partitions"]),
    ({"config": {"extract": {"colour": "red"}}}, ["config.extract.colour"]),
    ({"config": {"load": {"data_dir": "/etc"}}}, ["config.load"]),
])
async def test_a_config_the_steps_refuse_is_a_400_naming_every_problem(
        api: Client, redis: Redis, body: dict[str, Any], locs: list[str]) -> None:
    status, answer = await run(api, json=body)
    assert status == 400, answer
    assert answer["error"]["code"] == "bad_request"
    assert sorted(p["loc"] for p in answer["error"]["details"]["problems"]) == locs
    assert await redis.zcard(keys.batch_index("p")) == 0, "nothing was created"


@pytest.mark.parametrize("body", [
    b"[1]", b'"config"', b"null", b"not json", b'{"config": {}, "other": 1}',
    b'{"config": []}', b'{"config": {"extract": 3}}', b'{"rows": 5}',
])
async def test_a_body_that_is_not_a_run_request_is_a_400(api: Client, redis: Redis,
                                                         body: bytes) -> None:
    status, answer = await run(api, data=body, headers={**AUTH,
                                                        "Content-Type": "application/json"})
    assert status == 400, answer
    assert answer["error"]["code"] == "bad_request"
    assert answer["error"]["details"]["problems"], answer
    assert await redis.zcard(keys.batch_index("p")) == 0


async def test_the_idempotency_key_covers_the_body_by_its_meaning(api: Client) -> None:
    key = {**AUTH, "Idempotency-Key": "k-1", "Content-Type": "application/json"}
    status, first = await run(api, key, data=b'{"config": {"extract": {"rows": 5, "seed": 1}}}')
    assert status == 200, first
    # The same overrides with other spacing and key order: the same request.
    same = b'{ "config" : { "extract" : { "seed" : 1 , "rows" : 5 } , "load": {} } }'
    assert await run(api, key, data=same) == (200, first)
    status, answer = await run(api, key, json={"config": {"extract": {"rows": 6, "seed": 1}}})
    assert status == 409 and answer["error"]["code"] == "conflict", answer
    assert answer["error"]["details"]["differs"] == {"body": {
        "earlier": '{"extract":{"rows":5,"seed":1}}', "now": '{"extract":{"rows":6,"seed":1}}'}}
    assert "body" in answer["error"]["message"]
    # No body is another request too.
    status, answer = await run(api, {**AUTH, "Idempotency-Key": "k-1"})
    assert status == 409 and set(answer["error"]["details"]["differs"]) == {"body"}
    # And a body refused is refused before the key is looked at.
    status, answer = await run(api, key, json={"config": {"extract": {"rows": -1}}})
    assert status == 400


async def test_overrides_are_checked_against_the_version_asked_for(api: Client) -> None:
    v2 = {**SPEC, "version": "2", "steps": [{"name": "only", "uses": "sales.extract"}]}
    assert (await api.put("/api/v1/pipelines/p", json=v2, headers=AUTH)).status == 201
    status, answer = await run(api, json={"config": {"extract": {"rows": 1}}})
    assert status == 400 and answer["error"]["details"]["problems"][0]["loc"] == "config.extract"
    status, answer = await run(api, json={"config": {"extract": {"rows": 1}}},
                               params={"pipeline_version": "1"})
    assert status == 200, answer
    assert (await batch(api, answer["item"]))["config"]["extract"] == {"rows": 1, "seed": 7}
