"""The six batch endpoints on the real Redis and Kafka: success and error paths."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core import keys
from core.codec import decode_command
from core.settings import Settings
from service.appkeys import PRODUCER, STORE
from tests.helpers import AUTH, api_client, api_settings, read_topic, spec_body

Client = TestClient[Any, Any]


@pytest.fixture
async def api(topics: Settings, redis: Redis) -> AsyncIterator[Client]:
    async with api_client(api_settings(topics)) as client:
        response = await client.put("/api/v1/pipelines/pipeline-sales", json=spec_body(), headers=AUTH)
        assert response.status == 201
        yield client


async def read_commands(settings: Settings, count: int, timeout: float = 10,
                        types: tuple[str, ...] = ("run", "stop", "delete")) -> list[Any]:
    """The first `count` commands of those types on the test's topic (registering a
    pipeline queues a `deploy` command, which most tests here do not look at)."""
    def wanted(records: list[Any]) -> list[Any]:
        return [r for r in records if decode_command(r.value).type in types]

    records = await read_topic(settings, settings.topic_commands,
                               lambda rs: len(wanted(rs)) >= count, timeout)
    return wanted(records)[:count]


async def run(api: Client, pipeline: str = "pipeline-sales", **params: str) -> str:
    response = await api.post(f"/api/v1/batches/{pipeline}", params=params, headers=AUTH)
    assert response.status == 200, await response.text()
    body = await response.json()
    assert set(body) == {"item"}
    return str(body["item"])


async def test_run_creates_a_pending_batch_and_queues_a_run_command(api: Client, topics: Settings) -> None:
    batch_id = await run(api)
    assert batch_id.startswith("batch-")

    response = await api.get(f"/api/v1/batches/pipeline-sales/{batch_id}", headers=AUTH)
    assert response.status == 200
    batch = await response.json()
    assert batch["id"] == batch_id
    assert batch["name"] == "sales-pipeline"
    assert batch["deployment"] == "run-pipeline/sales-pipeline"
    # The contract's fields of each step; progress beside them (nothing known yet).
    assert batch["state"] == {
        "state": "pending",
        "steps": {s: {"state": "none", "offsets": {},
                      "progress": {"percent": None, "records_per_s": None, "eta_s": None}}
                  for s in ("extract", "transform", "load")},
    }
    assert list(batch["state"]["steps"]) == ["extract", "transform", "load"]
    assert batch["pipeline_id"] == "pipeline-sales" and batch["pipeline_version"] == "1"
    assert batch["created_at"] == batch["updated_at"]

    [record] = await read_commands(topics, 1)
    assert record.key == batch_id.encode()
    command = decode_command(record.value)
    assert (command.type, command.batch_id, command.pipeline_id, command.pipeline_version) == (
        "run", batch_id, "pipeline-sales", "1")
    assert orjson.loads(record.value)["schema"] == 1


async def test_latest_is_the_newest_batch_and_404_without_any(api: Client) -> None:
    response = await api.get("/api/v1/batches/pipeline-sales", headers=AUTH)
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"
    first = await run(api)
    second = await run(api)
    response = await api.get("/api/v1/batches/pipeline-sales", headers=AUTH)
    assert (await response.json())["id"] == second != first


async def test_latest_is_never_a_404_while_the_pipeline_has_a_batch(
        api: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deletes landing between latest's read of the index and its read of each hash (forced
    here: every batch read is hidden just before, but `kept`): latest reads the index on,
    past more than one read's worth, to the one left; with none left it is a 404."""
    ids = [await run(api) for _ in range(8)]
    store = api.app[STORE]
    real_get = store.get
    kept: str | None = ids[0]
    asked: list[str] = []

    async def get_racing_deletes(pipeline_id: str, batch_id: str) -> Any:
        asked.append(batch_id)
        if batch_id != kept:
            await store.hide(pipeline_id, batch_id)
        return await real_get(pipeline_id, batch_id)

    monkeypatch.setattr(store, "get", get_racing_deletes)
    response = await api.get("/api/v1/batches/pipeline-sales", headers=AUTH)
    assert response.status == 200, await response.text()
    assert (await response.json())["id"] == ids[0]
    assert asked == ids[::-1]  # newest first, each once
    kept = None
    response = await api.get("/api/v1/batches/pipeline-sales", headers=AUTH)
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"


async def test_pipeline_version_selects_the_steps(api: Client) -> None:
    v2 = spec_body(version="2", steps=("extract", "load"))
    assert (await api.put("/api/v1/pipelines/pipeline-sales", json=v2, headers=AUTH)).status == 201
    latest = await run(api)
    pinned = await run(api, pipeline_version="1")
    got = await (await api.get(f"/api/v1/batches/pipeline-sales/{latest}", headers=AUTH)).json()
    assert list(got["state"]["steps"]) == ["extract", "load"] and got["pipeline_version"] == "2"
    got = await (await api.get(f"/api/v1/batches/pipeline-sales/{pinned}", headers=AUTH)).json()
    assert list(got["state"]["steps"]) == ["extract", "transform", "load"]


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("POST", "/api/v1/batches/nope", 404, "not_found"),
        ("POST", "/api/v1/batches/pipeline-sales?pipeline_version=9", 404, "not_found"),
        ("POST", "/api/v1/batches/pipeline-sales?pipeline_version=a%20b", 400, "bad_request"),
        ("POST", "/api/v1/batches/bad%20id", 400, "bad_request"),
        ("GET", "/api/v1/batches/pipeline-sales/batch-unknown", 404, "not_found"),
        ("GET", "/api/v1/batches/pipeline-sales/" + "x" * 129, 400, "bad_request"),
        ("GET", "/api/v1/batches/pipeline-sales/?limit=0", 400, "bad_request"),
        ("GET", "/api/v1/batches/pipeline-sales/?limit=1001", 400, "bad_request"),
        ("GET", "/api/v1/batches/pipeline-sales/?limit=ten", 400, "bad_request"),
        # Unicode digits pass str.isdigit() but not int(): ASCII-only parsing.
        ("GET", "/api/v1/batches/pipeline-sales/?limit=%C2%B2", 400, "bad_request"),
        ("GET", "/api/v1/batches/pipeline-sales/?limit=%D9%A3", 400, "bad_request"),
        ("GET", "/api/v1/batches/pipeline-sales/?limit=" + "9" * 5000, 400, "bad_request"),
        ("GET", "/api/v1/batches/pipeline-sales/?token=garbage", 400, "bad_request"),
        ("PUT", "/api/v1/batches/pipeline-sales/batch-unknown/stop", 404, "not_found"),
        ("DELETE", "/api/v1/batches/pipeline-sales/batch-unknown", 404, "not_found"),
        ("GET", "/api/v1/nothing-here", 404, "not_found"),
        ("PATCH", "/api/v1/batches/pipeline-sales", 405, "method_not_allowed"),
    ],
)
async def test_errors_are_json_with_a_stable_shape(api: Client, redis: Redis, method: str, path: str,
                                                   status: int, code: str) -> None:
    before = sorted(await redis.keys("*"))
    response = await api.request(method, path, headers=AUTH)
    assert response.status == status
    assert response.content_type == "application/json"
    error = (await response.json())["error"]
    assert error["code"] == code and error["message"] and error["request_id"]
    assert sorted(await redis.keys("*")) == before, "a rejected request changed nothing"


async def test_stop_queues_a_stop_command_and_is_idempotent(api: Client, topics: Settings,
                                                            redis: Redis) -> None:
    batch_id = await run(api)
    for _ in range(2):
        response = await api.put(f"/api/v1/batches/pipeline-sales/{batch_id}/stop", headers=AUTH)
        assert response.status == 200
        assert await response.json() == {"message": "Batch stopped successfully"}
    records = await read_commands(topics, 3)
    assert [decode_command(r.value).type for r in records] == ["run", "stop", "stop"]
    # Once stopped, stopping again answers 200 and queues nothing more.
    await redis.hset(keys.batch("pipeline-sales", batch_id), "state", "stop")
    response = await api.put(f"/api/v1/batches/pipeline-sales/{batch_id}/stop", headers=AUTH)
    assert response.status == 200
    assert len(await read_commands(topics, 3)) == 3


async def test_delete_hides_the_batch_at_once_and_queues_a_delete(api: Client, topics: Settings) -> None:
    keep = await run(api)
    gone = await run(api)
    assert (await api.get(f"/api/v1/batches/pipeline-sales/{gone}", headers=AUTH)).status == 200
    response = await api.delete(f"/api/v1/batches/pipeline-sales/{gone}", headers=AUTH)
    assert response.status == 200
    assert await response.json() == {"message": "Batch deleted successfully"}
    assert (await api.get(f"/api/v1/batches/pipeline-sales/{gone}", headers=AUTH)).status == 404
    latest = await (await api.get("/api/v1/batches/pipeline-sales", headers=AUTH)).json()
    assert latest["id"] == keep
    page = await (await api.get("/api/v1/batches/pipeline-sales/", headers=AUTH)).json()
    assert list(page["items"]) == [keep]
    assert (await api.delete(f"/api/v1/batches/pipeline-sales/{gone}", headers=AUTH)).status == 404
    assert (await api.put(f"/api/v1/batches/pipeline-sales/{gone}/stop", headers=AUTH)).status == 404
    commands = [decode_command(r.value) for r in await read_commands(topics, 3)]
    # Keyed by batch id: one batch's commands share a partition and keep their order.
    assert [c.type for c in commands if c.batch_id == gone] == ["run", "delete"]
    assert [c.type for c in commands if c.batch_id == keep] == ["run"]


async def test_idempotency_key_returns_the_same_batch(api: Client, topics: Settings) -> None:
    headers = {**AUTH, "Idempotency-Key": "order-42"}
    first = await api.post("/api/v1/batches/pipeline-sales", headers=headers)
    again = await api.post("/api/v1/batches/pipeline-sales", headers=headers)
    assert (await first.json())["item"] == (await again.json())["item"]
    assert len((await (await api.get("/api/v1/batches/pipeline-sales/", headers=AUTH)).json())["items"]) == 1
    assert len(await read_commands(topics, 1)) == 1

    # Compared as sent: "latest" is not the version "1" it resolved to.
    pinned = await api.post("/api/v1/batches/pipeline-sales?pipeline_version=1", headers=headers)
    assert pinned.status == 409
    assert (await pinned.json())["error"]["code"] == "conflict"
    assert (await api.put("/api/v1/pipelines/other", json=spec_body(name="other"), headers=AUTH)).status == 201
    assert (await api.post("/api/v1/batches/other", headers=headers)).status == 409


async def test_kafka_refusing_the_run_command_answers_503_and_leaves_nothing(
        api: Client, redis: Redis) -> None:
    before = sorted(await redis.keys("*"))
    await api.app[PRODUCER].stop()  # the broker connection is gone: nothing can be queued
    response = await api.post("/api/v1/batches/pipeline-sales",
                              headers={**AUTH, "Idempotency-Key": "k-503"})
    assert response.status == 503
    assert (await response.json())["error"]["code"] == "unavailable"
    # The pipeline's own bookkeeping a first create sets (its sequence counter, its finished
    # index's backfill marker) may stay; nothing of the batch does.
    kept = {keys.batch_seq("pipeline-sales"), keys.batch_finished_indexed("pipeline-sales")}
    after = cast(list[str], await redis.keys("*"))
    # The undone batch's purge mark (keys.batch_purged, a day) is all it leaves.
    marks = [k for k in after if k.startswith(keys.batch_purged("pipeline-sales", ""))]
    assert len(marks) == 1
    assert sorted(k for k in after if k not in kept and k not in marks) == [
        k for k in before if k not in kept]
    assert (await api.get("/api/v1/batches/pipeline-sales", headers=AUTH)).status == 404


async def test_registering_a_pipeline_queues_its_deployment(api: Client, topics: Settings) -> None:
    [first] = await read_commands(topics, 1, types=("deploy",))
    command = decode_command(first.value)
    assert (command.pipeline_id, command.pipeline_version, command.batch_id) == ("pipeline-sales", "1", "")
    assert first.key == b"pipeline-sales"
    # Registering the same version again re-queues it (a retry heals a lost deployment).
    assert (await api.put("/api/v1/pipelines/pipeline-sales", json=spec_body(), headers=AUTH)).status == 200
    assert len(await read_commands(topics, 2, types=("deploy",))) == 2
