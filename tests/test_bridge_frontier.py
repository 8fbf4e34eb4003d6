"""The bridge's resume point within a session follows Prefect's event persister, not the
clock: what the live stream dropped is only replayed from the database once persisted, and
the persister may lag far behind (real Kafka and Redis; a session's events handed to the
bridge directly, with the server receipt times the stream carries)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis

from consumers.bridge import PrefectBridge
from core.codec import decode_event
from core.settings import Settings
from tests.helpers import read_topic
from tests.test_bridge_checkpoint import running_event, saved_at
from tests.test_consumers_support import options, unique


async def test_the_resume_point_stays_behind_what_the_persister_has_not_written(
        topics: Settings, redis: Redis) -> None:
    key = unique("test-frontier")
    start = datetime.now(UTC) - timedelta(minutes=2)
    await redis.set(key, start.isoformat())
    bridge = PrefectBridge(topics, options(), checkpoint_key=key)
    await bridge.start()
    try:
        subscribed = datetime.now(UTC)
        bridge._connected_at = subscribed  # a session subscribed now
        # Live events, received after the session subscribed: they say nothing about what
        # the persister has written, and the ones the stream dropped may not be written
        # even 30 s later, so the resume point stays where it was.
        await bridge.forward(running_event(subscribed), subscribed + timedelta(seconds=1))
        await bridge.settle()
        assert await saved_at(redis, key) == start
        # An event from the database (received 40 s before the session subscribed): the
        # persister has written all that was received until then, and no further.
        persisted_at = subscribed - timedelta(seconds=40)
        stored = running_event(persisted_at - timedelta(seconds=1))
        bridge._note_persisted(persisted_at)
        await bridge.forward(stored, subscribed + timedelta(seconds=2))
        await bridge.forward(running_event(subscribed + timedelta(seconds=3)),
                             subscribed + timedelta(seconds=3))
        await bridge.settle()
        assert await saved_at(redis, key) == persisted_at
    finally:
        await bridge.close()
    assert await saved_at(redis, key) == persisted_at


async def test_a_replayed_event_the_broker_acknowledged_is_not_sent_again(
        topics: Settings) -> None:
    bridge = PrefectBridge(topics, options(), checkpoint_key=unique("test-frontier"))
    await bridge.start()
    try:
        first, second = running_event(datetime.now(UTC)), running_event(datetime.now(UTC))
        await bridge.forward(first)
        await bridge.settle()
        await bridge.forward(first)  # the next session's backfill brings it again
        await bridge.forward(second)
        await bridge.settle()
    finally:
        await bridge.close()
    # One partition (one batch id), in the order sent: a resend would come second.
    records = await read_topic(topics, topics.topic_events, lambda rs: len(rs) >= 2)
    assert [decode_event(r.value).event_id for r in records] == [
        f"pf-{first.id}", f"pf-{second.id}"]
