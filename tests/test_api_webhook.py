"""The Prefect webhook ingress: HMAC-signed, replay-windowed, forwarded to the events topic."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from core.codec import decode_event
from core.settings import Settings
from service.webhook import signature
from tests.helpers import api_client, api_settings, read_topic

SECRET = "webhook-secret-for-tests"
CAPTURED = json.loads((Path(__file__).parent / "data" / "prefect_events.json").read_text())


def signed(body: bytes, secret: str = SECRET, at: float | None = None) -> dict[str, str]:
    ts = str(int(at if at is not None else time.time()))
    return {"X-Dhub-Timestamp": ts, "X-Dhub-Signature": signature(secret.encode(), ts, body),
            "Content-Type": "application/json"}


async def read_events(settings: Settings, count: int, timeout: float = 10) -> list[Any]:
    return await read_topic(settings, settings.topic_events, lambda rs: len(rs) >= count, timeout)


async def test_a_signed_prefect_event_is_forwarded(topics: Settings, redis: Redis) -> None:
    body = orjson.dumps(CAPTURED["flow_run_running"])
    async with api_client(api_settings(topics, webhook_secret=SecretStr(SECRET))) as api:
        response = await api.post("/api/v1/hooks/prefect", data=body, headers=signed(body))
        assert response.status == 202
        assert await response.json() == {"accepted": 1}
    [record] = await read_events(topics, 1)
    event = decode_event(record.value)
    assert (event.type, event.state) == ("batch.state", "running")
    assert record.key == event.batch_id.encode()
    tags = [r["prefect.resource.id"] for r in CAPTURED["flow_run_running"]["related"]]
    assert f"prefect.tag.dhub-batch:{event.batch_id}" in tags


@pytest.mark.parametrize("case", ["no-secret", "bad-signature", "stale", "future", "other-secret",
                                  "no-headers"])
async def test_unsigned_or_replayed_calls_are_refused(topics: Settings, redis: Redis, case: str) -> None:
    body = orjson.dumps(CAPTURED["flow_run_running"])
    headers = {
        "no-secret": signed(body),
        "bad-signature": {**signed(body), "X-Dhub-Signature": "sha256=" + "0" * 64},
        "stale": signed(body, at=time.time() - 310),  # past the window whatever the clock did
        "future": signed(body, at=time.time() + 310),
        "other-secret": signed(body, secret="not-the-secret"),
        "no-headers": {"Content-Type": "application/json"},
    }[case]
    secret = None if case == "no-secret" else SecretStr(SECRET)
    async with api_client(api_settings(topics, webhook_secret=secret)) as api:
        response = await api.post("/api/v1/hooks/prefect", data=body, headers=headers)
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "unauthorized"
        tampered = body.replace(b"Running", b"Cancelled")
        if case == "bad-signature":
            again = await api.post("/api/v1/hooks/prefect", data=tampered, headers=signed(body))
            assert again.status == 401
    with pytest.raises(TimeoutError):
        await read_events(topics, 1, timeout=1)


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"event": 5}', b'{"hello": "world"}'])
async def test_malformed_payloads_400(topics: Settings, redis: Redis, body: bytes) -> None:
    async with api_client(api_settings(topics, webhook_secret=SecretStr(SECRET))) as api:
        response = await api.post("/api/v1/hooks/prefect", data=body, headers=signed(body))
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "bad_request"


async def test_an_event_of_a_flow_run_id_that_is_no_uuid_is_refused_not_accepted(
        topics: Settings, redis: Redis) -> None:
    """It was answered 202 `accepted: 1`, and the events consumer then dead-lettered the
    event (the codec refuses such a flow_run_id): a Completed accepted and lost."""
    payload = copy.deepcopy(CAPTURED["flow_run_completed"])
    payload["resource"]["prefect.resource.id"] = "prefect.flow-run." + "f" * 300
    body = orjson.dumps(payload)
    async with api_client(api_settings(topics, webhook_secret=SecretStr(SECRET))) as api:
        response = await api.post("/api/v1/hooks/prefect", data=body, headers=signed(body))
        assert response.status == 400
        assert "UUID" in (await response.json())["error"]["message"]
    with pytest.raises(TimeoutError):
        await read_events(topics, 1, timeout=1)
