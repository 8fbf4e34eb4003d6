"""TAKE_KEY (core/api_scripts.py) on a real Redis: a pending Idempotency-Key record whose
lease passed is taken over by a retry of the same request, keeping its batch id; RELEASE_KEY
and COMMIT_KEY then go by the attempt that holds it and by the batch."""

from __future__ import annotations

from typing import cast

import orjson
from redis.asyncio import Redis

from core import keys
from core.api_scripts import ApiScripts
from service.idempotency import Sent
from tests.conftest import eventually

KEY = keys.idempotency("taken")


async def test_a_pending_record_is_taken_over_only_once_its_lease_passed(redis: Redis) -> None:
    s = ApiScripts(redis)
    sent = Sent.of("p", None, "")
    assert await s.claim_key(keys=[KEY], args=[sent.record("pending", "b1"), 200, 600]) is None
    record = orjson.loads(cast(str, await redis.get(KEY)))
    assert record["b"] == "b1" and isinstance(record["l"], int)
    # Its lease runs: not taken over.
    assert await s.take_key(keys=[KEY], args=["b1", "b2", 60_000]) == 0

    async def taken() -> bool:
        return bool(await s.take_key(keys=[KEY], args=["b1", "b2", 60_000]))

    assert await eventually(taken, timeout=5)
    record = orjson.loads(cast(str, await redis.get(KEY)))
    assert (record["s"], record["b"], record["a"]) == ("pending", "b1", "b2")
    assert 500 < await redis.ttl(KEY) <= 600  # the record's own TTL is kept
    # A second retry finds the new lease running, and the dead owner is no longer the owner.
    assert await s.take_key(keys=[KEY], args=["b2", "b3", 60_000]) == 0
    assert await s.take_key(keys=[KEY], args=["b1", "b3", 0]) == 0
    # The dead attempt's release frees nothing now; the taker's would.
    assert await s.release_key(keys=[KEY], args=["b1"]) == 0
    # Either attempt's commit is of the same batch: the dead one's late commit, the taker's.
    assert await s.commit_key(keys=[KEY], args=["b1", sent.record("committed", "b1"), 100]) == 1
    assert await s.commit_key(keys=[KEY], args=["b1", sent.record("committed", "b1"), 100]) == 1
    assert orjson.loads(cast(str, await redis.get(KEY)))["s"] == "committed"
    # A committed record is never taken over.
    assert await s.take_key(keys=[KEY], args=["b1", "b4", 0]) == 0


async def test_the_taker_releases_its_failed_attempt(redis: Redis) -> None:
    s = ApiScripts(redis)
    sent = Sent.of("p", None, "")
    assert await s.claim_key(keys=[KEY], args=[sent.record("pending", "b1"), 0, 600]) is None
    assert await s.take_key(keys=[KEY], args=["b1", "b2", 60_000]) == 1
    assert await s.release_key(keys=[KEY], args=["b2"]) == 1
    assert await redis.exists(KEY) == 0
    # A record of an earlier release (no lease: it expired with its own PX) is never taken.
    await redis.set(KEY, sent.record("pending", "b5"), px=60_000)
    assert await s.take_key(keys=[KEY], args=["b5", "b6", 0]) == 0
