"""The bridge's resume point: bounded by when events were received, moved only past events
the broker acknowledged (real Kafka and Redis; events handed to the bridge directly)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from prefect.events import Event as PrefectEvent
from redis.asyncio import Redis

from consumers.bridge import PrefectBridge
from consumers.plumbing.acks import PendingAcks
from core.codec import decode_event
from core.models import flow_run_tags
from core.settings import Settings
from tests.helpers import read_topic
from tests.test_consumers_support import options, unique


async def saved_at(redis: Redis, key: str) -> datetime:
    """The checkpoint the bridge stored under `key`."""
    raw = await redis.get(key)
    assert isinstance(raw, str), raw
    return datetime.fromisoformat(raw)


def running_event(occurred: datetime) -> PrefectEvent:
    return PrefectEvent.model_validate({
        "occurred": occurred,
        "event": "prefect.flow-run.Running",
        "resource": {"prefect.resource.id": f"prefect.flow-run.{uuid.uuid4()}",
                     "prefect.state-type": "RUNNING", "prefect.state-name": "Running"},
        "related": [{"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}
                    for tag in flow_run_tags("batch-x", "pipe-x", "1")],
        "id": uuid.uuid4(),
    })


async def test_an_event_from_a_clock_running_fast_does_not_move_the_checkpoint_past_now(
        topics: Settings, redis: Redis) -> None:
    key = unique("test-checkpoint")
    bridge = PrefectBridge(topics, options(bridge_replay_margin_s=60), checkpoint_key=key)
    await bridge.start()
    try:
        before = datetime.now(UTC)
        event = running_event(before + timedelta(hours=1))  # a worker's clock an hour ahead
        await bridge.forward(event)
        await bridge.settle()
        after = datetime.now(UTC)
    finally:
        await bridge.close()
    saved = await saved_at(redis, key)
    assert before <= saved <= after
    # Forwarded all the same.
    records = await read_topic(topics, topics.topic_events, lambda rs: len(rs) >= 1)
    assert decode_event(records[0].value).event_id == f"pf-{event.id}"
    # A restart resumes a margin before when it was received, not an hour from now.
    restarted = PrefectBridge(topics, options(bridge_replay_margin_s=60), checkpoint_key=key)
    await restarted.start()
    try:
        since = await restarted.since()
    finally:
        await restarted.close()
    assert since <= after - timedelta(seconds=60)


async def test_a_checkpoint_already_in_the_future_resumes_from_now(topics: Settings,
                                                                   redis: Redis) -> None:
    key = unique("test-checkpoint")
    await redis.set(key, (datetime.now(UTC) + timedelta(days=1)).isoformat())
    bridge = PrefectBridge(topics, options(bridge_replay_margin_s=60), checkpoint_key=key)
    await bridge.start()
    try:
        since = await bridge.since()
    finally:
        await bridge.close()
    assert since <= datetime.now(UTC) - timedelta(seconds=60)


async def test_a_mark_is_released_only_once_every_ack_before_it_arrived() -> None:
    loop = asyncio.get_running_loop()
    acks = PendingAcks()
    first, second = loop.create_future(), loop.create_future()
    t1, t2 = datetime.now(UTC), datetime.now(UTC) + timedelta(seconds=1)
    acks.add([first], t1)
    acks.add([second], t2)
    settling = asyncio.create_task(acks.settle())
    first.set_result(None)
    await asyncio.sleep(0.05)
    assert not settling.done()  # the second ack is still out
    second.set_result(None)
    assert await settling == t2
    assert await acks.settle() is None  # nothing pending any more


async def test_a_failed_ack_releases_no_mark() -> None:
    loop = asyncio.get_running_loop()
    acks = PendingAcks()
    failed, fine = loop.create_future(), loop.create_future()
    acks.add([failed, fine], datetime.now(UTC))
    failed.set_exception(ConnectionError("broker gone"))
    fine.set_result(None)
    with pytest.raises(ConnectionError):
        await acks.settle()
    assert len(acks) == 0
