"""`HOLD_FOR_UNDO` (core/api_scripts.py) on a real Redis, and the abandoner's use of it: a
failed attempt's undo or abandon acts only on a batch still the attempt's, renewing the
attempt's lease in the same call, so no retry takes the batch over before it is done; the
key is released after."""

from __future__ import annotations

from typing import cast

import orjson
from redis.asyncio import Redis

from core import keys
from core.api_scripts import ApiScripts
from core.settings import Settings
from core.store import BatchStore
from service.abandon import Abandoner, KeyHolder
from service.command_sender import CommandSender
from service.idempotency import Sent
from tests.helpers import spec

KEY = keys.idempotency("late-undo")
SENT = Sent.of("p", None, "")


async def _claimed(s: ApiScripts, attempt: str) -> None:
    assert await s.claim_key(keys=[KEY], args=[SENT.record("pending", attempt), 0, 600]) is None


async def test_a_pending_record_of_the_attempt_is_held_for_its_undo(redis: Redis) -> None:
    s = ApiScripts(redis)
    await _claimed(s, "b1")  # its lease (0 ms) passed at once
    assert await s.hold_for_undo(keys=[KEY], args=["b1", "b1", 60_000]) == 1
    held = orjson.loads(cast(str, await redis.get(KEY)))
    assert held["s"] == "pending" and held["b"] == "b1"
    # Its lease renewed: no retry takes the batch over while the undo runs.
    assert await s.take_key(keys=[KEY], args=["b1", "b3", 60_000]) == 0
    # Asked again (its reply lost, or the undo itself failed after it): still the attempt's.
    assert await s.hold_for_undo(keys=[KEY], args=["b1", "b1", 60_000]) == 1
    # Released once the undo is done, a retry claims afresh with a new id: the record is
    # then b2's, and b1's undo goes on.
    assert await s.release_key(keys=[KEY], args=["b1"]) == 1
    await _claimed(s, "b2")
    assert await s.hold_for_undo(keys=[KEY], args=["b1", "b1", 60_000]) == 1
    assert orjson.loads(cast(str, await redis.get(KEY)))["b"] == "b2"
    await redis.delete(KEY)
    assert await s.hold_for_undo(keys=[KEY], args=["b1", "b1", 60_000]) == 1  # gone


async def test_a_record_taken_over_or_committed_keeps_its_batch(redis: Redis) -> None:
    s = ApiScripts(redis)
    await _claimed(s, "b1")  # its lease (0 ms) passed at once
    assert await s.take_key(keys=[KEY], args=["b1", "b2", 60_000]) == 1
    before = await redis.get(KEY)
    assert await s.hold_for_undo(keys=[KEY], args=["b1", "b1", 60_000]) == 0  # the take-over's
    assert await redis.get(KEY) == before
    # The attempt that took it over owns it: its own failure undoes the batch.
    assert await s.hold_for_undo(keys=[KEY], args=["b2", "b1", 60_000]) == 1
    await redis.delete(KEY)
    await _claimed(s, "b1")
    assert await s.take_key(keys=[KEY], args=["b1", "b2", 60_000]) == 1
    assert await s.commit_key(keys=[KEY], args=["b1", SENT.record("committed", "b1"), 600]) == 1
    assert await s.hold_for_undo(keys=[KEY], args=["b1", "b1", 60_000]) == 0
    assert await s.hold_for_undo(keys=[KEY], args=["b2", "b1", 60_000]) == 0  # committed
    assert orjson.loads(cast(str, await redis.get(KEY)))["s"] == "committed"


async def test_a_late_undo_and_abandon_leave_a_taken_over_batch_and_do_their_own(
        redis: Redis, test_settings: Settings) -> None:
    store = BatchStore.from_settings(redis, test_settings)
    s = ApiScripts(redis)
    abandoner = Abandoner(redis, s, cast(CommandSender, None), purge=store.purge)
    for batch in ("b1", "b2"):
        await store.create("p", batch, spec())
    await _claimed(s, "b1")
    assert await s.take_key(keys=[KEY], args=["b1", "t1", 60_000]) == 1
    await abandoner.undo("p", "b1", holder=KeyHolder(KEY, "b1", 60_000))
    await abandoner.abandon("p", "b1", "1", "test", released=True, holder=KeyHolder(KEY, "b1", 60_000))
    assert await redis.hget(keys.batch("p", "b1"), "state") == "pending"
    assert await redis.zcard(keys.ABANDONED) == 0
    # Without a key, as before: undone. With the attempt's own key, undone and released.
    other = keys.idempotency("late-undo-2")
    assert await s.claim_key(keys=[other], args=[SENT.record("pending", "b2"), 0, 600]) is None
    await abandoner.undo("p", "b2", holder=KeyHolder(other, "b2", 60_000))
    assert await redis.exists(keys.batch("p", "b2"), other) == 0
    assert abandoner.undoing() == 0
