"""A long-poll GET (`If-None-Match` + `?wait=`) is authenticated once, when it arrives, and was
not bounded by its token's `exp` (push streams are: service.auth.until_expiry). A JWT that
expired while the GET was held still got the batch's next version, written after the expiry,
although the same token was refused (401) on every new request by then. The held request
now ends with a 401 at `exp`, having read nothing after it."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from redis.asyncio import Redis

from core.settings import Settings
from tests.cache_support import PIPELINE, cached_api, direct_store, new_batches, set_offset
from tests.conftest import eventually
from tests.helpers import AUTH, bearer
from tests.test_api_auth import hs_token


@pytest.mark.parametrize("kind", ["batch", "latest"])
async def test_a_held_long_poll_does_not_outlive_its_token(
        test_settings: Settings, redis: Redis, kind: str) -> None:
    store = direct_store(redis, test_settings)
    [batch_id] = await new_batches(store)
    path = (f"/api/v1/batches/{PIPELINE}/{batch_id}" if kind == "batch"
            else f"/api/v1/batches/{PIPELINE}")
    ttl = 3
    token = hs_token("batches:read", ttl=ttl)
    exp = int(time.time() + ttl)  # as hs_token computed it (same second, or one less)
    async with cached_api(test_settings) as api:
        etag = (await api.get(path, headers=AUTH)).headers["ETag"]
        held = asyncio.create_task(api.get(
            path + "?wait=30", headers={**bearer(token), "If-None-Match": etag}))
        try:
            # Wait (polled, with a deadline) until the token is past its exp and refused.
            await eventually(lambda: time.time() > exp + 1, timeout=ttl + 5)
            refused = await api.get(path, headers=bearer(token))
            assert refused.status == 401  # the token is expired for every new request
            still_held = not held.done()
            # A change made after the token expired.
            await set_offset(store, batch_id, 4242)
            async with asyncio.timeout(15):
                response = await held
            body = await response.read()
        finally:
            held.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await held
    assert not (still_held and response.status == 200 and b"4242" in body), (
        f"the long-poll held past its token's exp and answered {response.status} with the "
        f"version written after the expiry: {body[:200]!r}")
    assert response.status == 401, body
