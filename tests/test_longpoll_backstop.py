"""A held long-poll's backstop read (every cache TTL, when no change woke it) is Redis's truth.

The rev orders what the cache answers a held long-poll after its first read: a lagging feed's
older versions are no change. A read straight from Redis is never older than any version the
client was given, so one whose ETag differs is a change even at the same or a lower rev:

- a body that changed without a write, at the same rev (a step's `stalled` flag is decided
  when it is rendered);
- a hash restored at a lower rev (a rebuild, a restart that lost its last writes), which a
  later event brings back to the named rev with other contents.

Both were answered 304 with the named ETag at the end of the wait, hiding the change for the
whole wait instead of at most a TTL. Push streams already read it so (service.streams)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import cast

import pytest
from redis.asyncio import Redis

import core.layout
from core import keys
from core.codec import Event
from core.settings import Settings
from service.cache import BatchCache
from tests.cache_support import PIPELINE, cached_api, direct_store, engines, new_batches, set_offset
from tests.helpers import AUTH

TTL_S = 0.5
WAIT_S = 4


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    yield from engines("redis")


async def test_a_hash_restored_at_a_lower_rev_while_held_is_answered(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [batch_id] = await new_batches(store)
    await set_offset(store, batch_id, 5)
    path = f"/api/v1/batches/{PIPELINE}/{batch_id}"
    key = keys.batch(PIPELINE, batch_id)
    async with cached_api(test_settings, BatchCache(ttl_s=TTL_S, silence_s=2.5)) as api:
        first = await api.get(path, headers=AUTH)
        named = first.headers["ETag"]
        rev = int(cast(str, await redis.hget(key, "rev")))
        held = asyncio.create_task(api.get(f"{path}?wait={WAIT_S}",
                                           headers={**AUTH, "If-None-Match": named}))
        await asyncio.sleep(0.2)
        # The restore, written without a message (as RESTORE_HASHES does): the offset's
        # write undone, its rev with it. Then an event brings the rev back to the named one.
        await redis.hdel(key, "off:extract:0", "moved:extract")
        await redis.hset(key, "rev", str(rev - 1))
        await set_offset(store, batch_id, 7)
        assert int(cast(str, await redis.hget(key, "rev"))) == rev
        started = time.monotonic()
        response = await held
        assert response.status == 200
        assert b'"0":7' in await response.read()
        assert response.headers["ETag"] != named
        assert time.monotonic() - started < WAIT_S - 1  # at the backstop, not the deadline


async def test_a_body_changed_at_the_same_rev_is_answered_within_a_ttl(
        test_settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core.layout, "stall_after_s", lambda: 1.0)
    store = direct_store(redis, test_settings)
    [batch_id] = await new_batches(store)
    await store.apply([Event("batch.state", batch_id, PIPELINE, state="running"),
                       Event("step.state", batch_id, PIPELINE, step="extract", state="running")])
    await set_offset(store, batch_id, 5)
    path = f"/api/v1/batches/{PIPELINE}/{batch_id}"
    async with cached_api(test_settings, BatchCache(ttl_s=TTL_S, silence_s=2.5)) as api:
        first = await api.get(path, headers=AUTH)
        assert b"stalled" not in await first.read()
        started = time.monotonic()
        response = await api.get(f"{path}?wait={WAIT_S}",
                                 headers={**AUTH, "If-None-Match": first.headers["ETag"]})
        assert response.status == 200
        assert b'"stalled":true' in await response.read()
        assert time.monotonic() - started < WAIT_S - 1
