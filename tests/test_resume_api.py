"""`POST /api/v1/batches/{pipeline_id}/{batch_id}/resume` on the real Redis and Kafka (no
worker: the old batch's story is written by applying its events to Redis as the events
consumer does): what the new batch is recorded with, what is refused, the run command
queued, and the Idempotency-Key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core import keys
from core.codec import Event, decode_command
from core.scripts import Scripts
from core.settings import Settings
from core.store import BatchStore
from tests.helpers import AUTH, api_client, api_settings, read_topic

Client = TestClient[Any, Any]
P = "p"
SPEC = {"name": "sales-pipeline", "version": "1", "steps": [
    {"name": "extract", "uses": "sales.extract", "config": {"rows": 100, "seed": 7}},
    {"name": "transform", "uses": "sales.transform", "config": {"fail_at": "transform"}},
    {"name": "load", "uses": "sales.load", "config": {"rows": 100}}]}


@pytest.fixture
async def api(topics: Settings, redis: Redis) -> AsyncIterator[Client]:
    async with api_client(api_settings(topics)) as client:
        assert (await client.put(f"/api/v1/pipelines/{P}", json=SPEC, headers=AUTH)).status == 201
        yield client


async def old_batch(api: Client, redis: Redis, *events: Event, body: Any = None) -> str:
    """A batch created through the API, then moved on by `events` (the flow's, applied as
    the events consumer applies them)."""
    response = await api.post(f"/api/v1/batches/{P}", headers=AUTH, json=body)
    assert response.status == 200
    batch_id: str = (await response.json())["item"]
    store = BatchStore(redis, Scripts(redis), token_secret=b"t")
    await store.apply([Event(e.type, batch_id, P, event_id=f"{batch_id}-{n}",
                             **{k: v for k, v in e.to_dict().items()
                                if k in ("state", "outcome", "reason", "step", "offsets",
                                         "totals") and v is not None})
                       for n, e in enumerate(events)])
    return batch_id


def ev(kind: str, **fields: Any) -> Event:
    return Event(kind, "x", P, **fields)


FAILED_IN_TRANSFORM = (
    ev("batch.state", state="running"),
    ev("step.state", step="extract", state="running"),
    ev("step.offsets", step="extract", offsets={"partition_0": 50, "partition_1": 50},
       totals={"partition_0": 50, "partition_1": 50}),
    ev("step.state", step="extract", state="success"),
    ev("step.state", step="transform", state="running"),
    ev("step.offsets", step="transform", offsets={"partition_0": 30, "partition_1": 20},
       totals={"partition_0": 48, "partition_1": 47}),
    ev("step.state", step="transform", state="failed"),
    ev("batch.state", state="stop", outcome="failed", reason="on purpose"),
)


async def resume(api: Client, batch_id: str, headers: dict[str, str] | None = None,
                 **kwargs: Any) -> tuple[int, Any]:
    response = await api.post(f"/api/v1/batches/{P}/{batch_id}/resume",
                              headers=headers or AUTH, **kwargs)
    return response.status, await response.json()


async def get(api: Client, batch_id: str) -> dict[str, Any]:
    response = await api.get(f"/api/v1/batches/{P}/{batch_id}", headers=AUTH)
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body


async def test_the_new_batch_starts_where_the_old_one_stopped(
        api: Client, redis: Redis, topics: Settings) -> None:
    old_id = await old_batch(api, redis, *FAILED_IN_TRANSFORM,
                             body={"config": {"extract": {"rows": 99}}})
    status, body = await resume(api, old_id, json={"config": {"transform": {"fail_at": None}}})
    assert status == 200, body
    new_id = body["item"]
    assert new_id != old_id
    new = await get(api, new_id)
    assert (new["resumed_from"], new["pipeline_version"]) == (old_id, "1")
    assert new["state"]["state"] == "pending" and new["outcome"] is None
    steps = new["state"]["steps"]
    # Done steps are done at once with their offsets; the first not done carries its old
    # offsets (where it starts); the ones after it start from zero.
    assert {name: (s["state"], s["offsets"]) for name, s in steps.items()} == {
        "extract": ("success", {"partition_0": 50, "partition_1": 50}),
        "transform": ("none", {"partition_0": 30, "partition_1": 20}),
        "load": ("none", {})}
    assert steps["extract"]["progress"]["percent"] == 100.0
    # What transform had done is not counted in its rate once it runs again.
    assert await redis.hget(keys.batch(P, new_id), "resumed:transform") == "50"
    # The old batch's effective config (its own override kept), the body's merged over it.
    assert new["config"] == {"extract": {"rows": 99, "seed": 7}, "transform": {"fail_at": None},
                             "load": {"rows": 100}}
    # The old batch is as it was.
    old = await get(api, old_id)
    assert old["state"]["steps"]["transform"]["state"] == "failed" and "resumed_from" not in old

    def runs(records: list[Any]) -> list[Any]:
        return [c for r in records if (c := decode_command(r.value)).type == "run"]

    records = await read_topic(topics, topics.topic_commands, lambda rs: len(runs(rs)) >= 2)
    # Keyed by batch: the two runs may be on different partitions, in either order.
    assert {(c.batch_id, c.pipeline_version) for c in runs(records)} == {(old_id, "1"),
                                                                        (new_id, "1")}


async def test_a_resume_of_a_resumed_batch_keeps_what_both_did(api: Client, redis: Redis) -> None:
    old_id = await old_batch(api, redis, *FAILED_IN_TRANSFORM)
    status, body = await resume(api, old_id)
    assert status == 200
    store = BatchStore(redis, Scripts(redis), token_secret=b"t")
    second = body["item"]
    await store.apply([
        Event("step.offsets", second, P, step="transform", offsets={"partition_0": 48}),
        Event("step.state", second, P, step="transform", state="success", event_id="a"),
        Event("step.state", second, P, step="load", state="failed", event_id="b"),
        Event("batch.state", second, P, state="stop", outcome="cancelled", event_id="c")])
    status, body = await resume(api, second)
    assert status == 200, body
    steps = (await get(api, body["item"]))["state"]["steps"]
    assert {name: (s["state"], s["offsets"]) for name, s in steps.items()} == {
        "extract": ("success", {"partition_0": 50, "partition_1": 50}),
        "transform": ("success", {"partition_0": 48, "partition_1": 20}),
        "load": ("none", {})}
    assert (await get(api, body["item"]))["resumed_from"] == second


@pytest.mark.parametrize(("events", "status", "word"), [
    ((), 409, "pending"),
    ((ev("batch.state", state="running"),), 409, "running"),
    ((ev("batch.state", state="stop", outcome="completed"),), 409, "completed"),
])
async def test_only_a_stopped_batch_that_did_not_complete_is_resumed(
        api: Client, redis: Redis, events: tuple[Event, ...], status: int, word: str) -> None:
    batch_id = await old_batch(api, redis, *events)
    got, body = await resume(api, batch_id)
    assert (got, body["error"]["code"]) == (status, "conflict"), body
    assert word in body["error"]["message"]
    assert await redis.zcard(keys.batch_index(P)) == 1, "no batch was created"


@pytest.mark.parametrize("outcome", ["failed", "cancelled", "crashed"])
async def test_any_other_outcome_is_resumed(api: Client, redis: Redis, outcome: str) -> None:
    batch_id = await old_batch(api, redis, ev("batch.state", state="stop", outcome=outcome))
    status, body = await resume(api, batch_id)
    assert status == 200, body


async def test_an_unknown_or_deleted_batch_is_a_404(api: Client, redis: Redis) -> None:
    status, body = await resume(api, "batch-nope")
    assert (status, body["error"]["code"]) == (404, "not_found")
    batch_id = await old_batch(api, redis, *FAILED_IN_TRANSFORM)
    assert (await api.delete(f"/api/v1/batches/{P}/{batch_id}", headers=AUTH)).status == 200
    status, body = await resume(api, batch_id)
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, body = await resume(api, "bad id!")
    assert status in (400, 404)


async def test_a_config_the_steps_refuse_is_a_400(api: Client, redis: Redis) -> None:
    batch_id = await old_batch(api, redis, *FAILED_IN_TRANSFORM)
    for body, loc in (({"config": {"transform": {"rows": -1}}}, "config.transform.rows"),
                      ({"config": {"nope": {}}}, None), ({"other": 1}, "other")):
        status, answer = await resume(api, batch_id, json=body)
        assert status == 400, answer
        problems = answer["error"]["details"]["problems"]
        assert loc is None or [p["loc"] for p in problems] == [loc], problems
    assert await redis.zcard(keys.batch_index(P)) == 1


async def test_the_idempotency_key_gives_one_new_batch_per_request(
        api: Client, redis: Redis) -> None:
    batch_id = await old_batch(api, redis, *FAILED_IN_TRANSFORM)
    key = {**AUTH, "Idempotency-Key": "resume-1"}
    body = {"config": {"transform": {"fail_at": None}}}
    status, first = await resume(api, batch_id, key, json=body)
    assert status == 200
    assert await resume(api, batch_id, key, data=b'{"config":{"transform":{"fail_at":null}}}',
                        ) == (200, first)
    status, answer = await resume(api, batch_id, key)
    assert status == 409 and set(answer["error"]["details"]["differs"]) == {"body"}
    other = await old_batch(api, redis, *FAILED_IN_TRANSFORM)
    status, answer = await resume(api, other, key, json=body)
    assert status == 409 and answer["error"]["details"]["differs"] == {
        "request": {"earlier": f"resume {batch_id}", "now": f"resume {other}"}}
    # A run with the key of a resume is another request too.
    response = await api.post(f"/api/v1/batches/{P}", headers=key, json=body)
    assert response.status == 409
    assert await redis.zcard(keys.batch_index(P)) == 3  # two old ones, one resumed
