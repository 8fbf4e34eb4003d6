"""The write path's Lua scripts (core/api_scripts.py) on a real Redis: the Idempotency-Key
record's transitions and the abandoning of a batch, which the commands consumer then skips."""

from __future__ import annotations

from typing import Any, cast

import orjson
from redis.asyncio import Redis

from consumers.plumbing.command_effects import CommandEffects
from core import keys
from core.api_scripts import ApiScripts
from core.codec import Command
from core.settings import Settings
from core.store import BatchStore
from service.idempotency import Sent
from tests.helpers import spec

KEY = keys.idempotency("k")


async def test_claim_commit_and_release_are_owned_transitions(redis: Redis) -> None:
    s = ApiScripts(redis)
    sent = Sent.of("p", None, "")
    assert await s.claim_key(keys=[KEY], args=[sent.record("pending", "b1"), 60_000, 600]) is None
    # A second attempt only reads the first's record.
    existing = await s.claim_key(keys=[KEY], args=[sent.record("pending", "b2"), 60_000, 600])
    assert orjson.loads(existing)["b"] == "b1"
    # The record outlives its lease (60 s): a retry after its attempt died finds its batch id.
    assert 60_000 < await redis.pttl(KEY) <= 600_000
    # Only the owner commits or releases.
    assert await s.commit_key(keys=[KEY], args=["b2", sent.record("committed", "b2"), 100]) == 0
    assert await s.release_key(keys=[KEY], args=["b2"]) == 0
    assert await s.commit_key(keys=[KEY], args=["b1", sent.record("committed", "b1"), 100]) == 1
    assert orjson.loads(cast(str, await redis.get(KEY)))["s"] == "committed"
    assert 0 < await redis.ttl(KEY) <= 100
    # The owner's commit run again (its reply was lost and the client retried it) is still
    # a success, and changes nothing; another attempt's is not.
    await redis.expire(KEY, 50)
    assert await s.commit_key(keys=[KEY], args=["b1", sent.record("committed", "b1"), 100]) == 1
    assert 0 < await redis.ttl(KEY) <= 50
    assert await s.commit_key(keys=[KEY], args=["b2", sent.record("committed", "b2"), 100]) == 0
    # A committed record is never released.
    assert await s.release_key(keys=[KEY], args=["b1"]) == 0
    await redis.delete(KEY)
    assert await s.claim_key(keys=[KEY], args=[sent.record("pending", "b3"), 60_000, 600]) is None
    assert await s.release_key(keys=[KEY], args=["b3"]) == 1
    assert await redis.exists(KEY) == 0
    # A pending record that expired before its commit went through (Redis away meanwhile):
    # the batch runs, so the commit takes the key, and a retry gets that batch (diff review).
    assert await s.claim_key(keys=[KEY], args=[sent.record("pending", "b4"), 60_000, 600]) is None
    await redis.delete(KEY)  # its TTL passed
    assert await s.commit_key(keys=[KEY], args=["b4", sent.record("committed", "b4"), 100]) == 1
    assert orjson.loads(cast(str, await redis.get(KEY)))["b"] == "b4"


async def test_an_abandoned_batch_is_hidden_failed_expiring_and_its_run_skipped(
        redis: Redis, test_settings: Settings) -> None:
    store = BatchStore.from_settings(redis, test_settings)
    await store.create("p", "b1", spec())
    s = ApiScripts(redis)
    args: list[str | int] = ["b1", "2026-01-01T00:00:00.000Z", "not confirmed", 600, ""]
    batch_keys = [keys.batch("p", "b1"), keys.batch_index("p"), keys.batch_seen("p", "b1")]
    assert await s.abandon_batch(keys=batch_keys, args=args) == 1
    assert await s.abandon_batch(keys=batch_keys, args=args) == 0
    fields = await redis.hgetall(keys.batch("p", "b1"))
    assert (fields["state"], fields["outcome"], fields["reason"]) == ("stop", "failed",
                                                                       "not confirmed")
    assert "deleted" in fields and fields["rev"] == "2"
    assert 0 < await redis.ttl(keys.batch("p", "b1")) <= 600
    assert await redis.zscore(keys.batch_index("p"), "b1") is None
    assert await store.get("p", "b1") is None
    assert await s.abandon_batch(keys=[keys.batch("p", "nope"), keys.batch_index("p"),
                                       keys.batch_seen("p", "nope")], args=args) == 0

    # The commands consumer's run skips it having read only the batch: every other client of
    # the run (Prefect, the registry, Kafka...) is missing here, and touching one would raise.
    missing = cast(Any, None)
    effects = CommandEffects(store, *[missing] * 8)
    await effects.run(Command("run", "b1", "p", pipeline_version="1"))
