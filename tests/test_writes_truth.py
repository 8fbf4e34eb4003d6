"""The API's writes under faults: each answer says what then happens.

The API's producer talks to the shared broker through a proxy this test mutes (the broker
writes what it is sent, its answers are lost: tests/write_faults_proxy.py)."""

from __future__ import annotations

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
async def proxy(topics: Settings) -> AsyncIterator[KafkaProxy]:
    kafka = KafkaProxy(topics.kafka_bootstrap.split(",")[0])
    await kafka.start()
    try:
        yield kafka
    finally:
        await kafka.close()


@pytest.fixture
async def api(topics: Settings, redis: Redis, proxy: KafkaProxy) -> AsyncIterator[Client]:
    settings = api_settings(topics, kafka_bootstrap=proxy.address)
    async with api_client(settings) as client:
        response = await client.put("/api/v1/pipelines/p", json=spec_body(), headers=AUTH)
        assert response.status == 201
        yield client


def _of(records: list[Any], batch_id: str) -> list[str]:
    return [c.type for c in map(decode_command, (r.value for r in records))
            if c.batch_id == batch_id]


async def test_a_stop_kafka_did_not_confirm_is_answered_as_what_happens(
        api: Client, proxy: KafkaProxy, redis: Redis, topics: Settings) -> None:
    posted = await api.post("/api/v1/batches/p", headers=AUTH)
    assert posted.status == 200
    batch_id = (await posted.json())["item"]

    proxy.mute()  # the broker writes the stop command; its answer is lost
    stopped = await api.put(f"/api/v1/batches/p/{batch_id}/stop", headers=AUTH)
    body = await stopped.json()
    proxy.restore()
    # The stop may be on the topic (it is, here), so it will happen: a 503 ("unavailable,
    # retry later") told the client its batch runs on, and then it stopped. The answer is
    # the stop's acceptance, the command queued again until Kafka confirms one.
    assert stopped.status == 200, body
    assert body == {"message": "Batch stopped successfully"}
    records = await read_topic(topics, topics.topic_commands,
                               lambda rs: _of(rs, batch_id).count("stop") >= 2, timeout=30)
    assert _of(records, batch_id)[0] == "run"

    async def sent_out() -> bool:
        return await redis.zcard(keys.ABANDONED) == 0 and not await redis.keys(
            f"{keys.ABANDONED}*")

    await eventually(sent_out, timeout=15)
