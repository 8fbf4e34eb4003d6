"""The API's writes through a Kafka outage: the API's producer talks to the shared broker
through a proxy this test cuts, blackholes or mutes (tests/write_faults_proxy.py).

- once Kafka is known to be unreachable, POST / stop / delete answer 503 JSON within 1 s and
  a 503 POST leaves no batch;
- a send whose outcome is unknown (the broker wrote the run command, the answer was lost)
  leaves no runnable batch: it is hidden with `stop`/`failed` and a delete command is queued
  behind the run command, so the commands consumer skips the run and cleans up.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core import keys
from core.codec import decode_command
from core.settings import Settings
from tests.conftest import eventually
from tests.helpers import AUTH, api_client, api_settings, read_topic, spec_body
from tests.write_faults_proxy import KafkaProxy

Client = TestClient[Any, Any]


@pytest.fixture
async def api(topics: Settings, redis: Redis, proxy: KafkaProxy) -> AsyncIterator[Client]:
    settings = api_settings(topics, kafka_bootstrap=proxy.address)
    async with api_client(settings) as client:
        response = await client.put("/api/v1/pipelines/p", json=spec_body(), headers=AUTH)
        assert response.status == 201
        yield client


async def _timed(api: Client, method: str, path: str, **kwargs: Any) -> tuple[int, Any, float]:
    started = time.monotonic()
    response = await api.request(method, path, headers=AUTH, **kwargs)
    assert response.content_type == "application/json"
    body = await response.json()
    return response.status, body, time.monotonic() - started


async def _listed(api: Client) -> list[str]:
    response = await api.get("/api/v1/batches/p/", headers=AUTH)
    return list((await response.json())["items"])


@pytest.mark.parametrize("outage", ["cut", "blackhole"])
async def test_while_kafka_is_known_down_writes_answer_503_within_1s(
        api: Client, proxy: KafkaProxy, outage: str) -> None:
    ok = await _timed(api, "POST", "/api/v1/batches/p")
    assert ok[0] == 200
    kept = ok[1]["item"]

    getattr(proxy, outage)()
    first = await _timed(api, "POST", "/api/v1/batches/p")
    assert first[0] == 503 and first[1]["error"]["code"] == "unavailable"
    print(f"\n{outage}: first POST answered 503 after {first[2]:.2f}s")
    later = [await _timed(api, "POST", "/api/v1/batches/p") for _ in range(5)]
    later.append(await _timed(api, "PUT", f"/api/v1/batches/p/{kept}/stop"))
    later.append(await _timed(api, "DELETE", f"/api/v1/batches/p/{kept}"))
    assert [status for status, _, _ in later] == [503] * 7
    slowest = max(seconds for _, _, seconds in later)
    print(f"{outage}: later writes answered 503 in at most {slowest:.3f}s")
    assert slowest < 1.0
    # Every 503 left no batch (and the stop / delete changed nothing).
    assert await _listed(api) == [kept]

    proxy.restore()

    async def accepted() -> bool:
        return (await _timed(api, "POST", "/api/v1/batches/p"))[0] == 200

    started = time.monotonic()
    await eventually(accepted, timeout=30, interval=0.2)
    print(f"{outage}: POSTs accepted again {time.monotonic() - started:.1f}s after Kafka returned")


async def test_an_ambiguous_send_leaves_no_runnable_batch_and_queues_its_delete(
        api: Client, proxy: KafkaProxy, redis: Redis, topics: Settings) -> None:
    proxy.mute()  # the broker receives and writes the run command; its answer is lost
    status, body, seconds = await _timed(api, "POST", "/api/v1/batches/p")
    assert status == 503 and body["error"]["code"] == "unavailable"
    assert seconds < 10, "a client with a 10 s timeout must see the answer"
    proxy.restore()

    def runs(records: list[Any]) -> list[str]:
        return [c.batch_id for c in map(decode_command, (r.value for r in records))
                if c.type == "run"]

    records = await read_topic(topics, topics.topic_commands, lambda rs: bool(runs(rs)))
    [batch_id] = runs(records)  # written once, though the API could not know it
    assert await _listed(api) == []
    got = await api.get(f"/api/v1/batches/p/{batch_id}", headers=AUTH)
    assert got.status == 404
    # The commands consumer skips a run command of a hidden (or absent) batch.
    fields = await redis.hgetall(keys.batch("p", batch_id))
    if fields:
        assert "deleted" in fields
        assert (fields["state"], fields["outcome"]) == ("stop", "failed")
        assert "run command" in fields["reason"]
        assert await redis.ttl(keys.batch("p", batch_id)) > 0, "a backstop TTL"
    # Out of the filtered list's indexes too, not only skipped there by its hash.
    for index in keys.batch_filter_indexes("p"):
        assert await redis.zscore(index, batch_id) is None, index

    # Once Kafka is back, a delete is queued after the run (same key, same partition), so a
    # flow run the consumer may already have created is cancelled and removed.
    def ordered(records: list[Any]) -> list[tuple[str, int, int]]:
        return [(c.type, r.partition, r.offset) for r in records
                if (c := decode_command(r.value)).batch_id == batch_id]

    records = await read_topic(topics, topics.topic_commands,
                               lambda rs: any(t == "delete" for t, _, _ in ordered(rs)), timeout=30)
    commands = ordered(records)
    assert [t for t, _, _ in commands] == ["run", "delete"]
    assert commands[0][1] == commands[1][1] and commands[0][2] < commands[1][2]
