"""A failed flow run's Prefect state message becomes the batch's `reason` (a Kafka record on
the events topic, then the Redis hash GET shows to every batches:read token). It went there
without the URL-password masking the consumers apply to their own reasons
(core.retry.describe -> core.logs.scrub): Prefect's Failed/Crashed message quotes the
exception, and httpx/Prefect errors quote the request's URL, DHUB_PREFECT_API_URL's
credentials included (the case core.logs names). Both translations of a state now scrub it:
core.prefect_events (bridge, webhook, reconciler, commands) and pipelines.state_hooks."""

from __future__ import annotations

import copy
from typing import Any

import orjson
from pydantic import SecretStr
from redis.asyncio import Redis

from core.codec import decode_event
from core.prefect_events import translate
from core.retry import describe
from core.settings import Settings
from tests.helpers import api_client, api_settings
from tests.test_api_webhook import CAPTURED, SECRET, read_events, signed

PASSWORD = "hunter2-prefect-pw"
MESSAGE = ("Flow run encountered an exception: PrefectHTTPStatusError: Server error "
           "'503 Service Unavailable' for url "
           f"'http://dhub:{PASSWORD}@prefect.internal:4200/api/task_runs/x/set_state'")


def failed_event() -> dict[str, Any]:
    payload: dict[str, Any] = copy.deepcopy(CAPTURED["flow_run_failed"])
    payload["resource"]["prefect.state-message"] = MESSAGE
    return payload


def test_the_same_text_is_masked_when_the_consumers_write_a_reason() -> None:
    assert PASSWORD not in describe(RuntimeError(MESSAGE))  # the project's own rule


def test_a_prefect_state_message_reaches_the_reason_masked() -> None:
    [event] = translate(failed_event())  # the bridge and the webhook both translate so
    assert event.reason is not None
    assert PASSWORD not in event.reason, event.reason


async def test_the_webhook_keeps_the_password_off_the_events_topic(topics: Settings,
                                                                 redis: Redis) -> None:
    body = orjson.dumps(failed_event())
    async with api_client(api_settings(topics, webhook_secret=SecretStr(SECRET))) as api:
        response = await api.post("/api/v1/hooks/prefect", data=body, headers=signed(body))
        assert response.status == 202
    [record] = await read_events(topics, 1)
    event = decode_event(record.value)
    assert PASSWORD.encode() not in record.value, event.reason


def test_the_flow_hooks_reason_is_masked() -> None:
    """The flow's state hooks give their stop the reason `state_reason` makes of the state's
    message (pipelines.state_hooks), as the bridge's translation does."""
    from prefect.states import Failed

    from core.prefect_events import state_reason

    reason = state_reason(Failed(message=MESSAGE).message)
    assert reason is not None and PASSWORD not in reason and "***" in reason
