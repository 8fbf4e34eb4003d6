"""Conditional and long-poll GETs: ETag, If-None-Match -> 304, ?wait= held until a change."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core.settings import Settings
from service.appkeys import WAITERS
from service.conditional import matches
from tests.cache_support import PIPELINE, cache_of, cached_api, direct_store, engines, new_batches, set_offset
from tests.conftest import eventually
from tests.helpers import AUTH


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    yield from engines("redis")


def test_if_none_match_lists_and_weak_tags() -> None:
    assert matches('"a"', '"a"')
    assert matches('"x", W/"a"', '"a"')
    assert matches("*", '"a"')
    assert not matches('"b"', '"a"')
    assert not matches("", '"a"')


async def _get(api: TestClient[Any, Any], path: str, **headers: str) -> tuple[int, Any, str]:
    response = await api.get(path, headers={**AUTH, **headers})
    body = await response.read()
    return response.status, body, response.headers.get("ETag", "")



async def test_an_etag_that_changes_exactly_when_the_batch_does(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    path = f"/api/v1/batches/{PIPELINE}/{target}"
    async with cached_api(test_settings) as api:
        status, body, etag = await _get(api, path)
        assert status == 200 and etag.startswith('"')
        assert (await _get(api, path))[2] == etag  # unchanged: same tag (cached or not)
        status, body304, tag304 = await _get(api, path, **{"If-None-Match": etag})
        assert (status, body304, tag304) == (304, b"", etag)
        await set_offset(store, target, 5)

        async def changed() -> bool:
            return (await _get(api, path, **{"If-None-Match": etag}))[0] == 200
        await eventually(changed, timeout=5)
        status, body, new_etag = await _get(api, path, **{"If-None-Match": etag})
        assert status == 200 and new_etag != etag and b'"0":5' in body
        # The latest batch of the pipeline answers the same way.
        latest = f"/api/v1/batches/{PIPELINE}"
        status, _, latest_tag = await _get(api, latest)
        assert status == 200 and (await _get(api, latest, **{"If-None-Match": latest_tag}))[0] == 304


async def test_a_held_get_answers_at_the_change_without_polling(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    path = f"/api/v1/batches/{PIPELINE}/{target}?wait=20"
    async with cached_api(test_settings) as api:
        cache = cache_of(api)
        _, _, etag = await _get(api, path)
        lookups = cache.hits + cache.misses
        held = asyncio.create_task(_get(api, path, **{"If-None-Match": etag}))
        await eventually(lambda: len(api.app[WAITERS]) == 1, timeout=5)
        await asyncio.sleep(0.5)  # held: a poller would read the batch meanwhile
        assert not held.done() and cache.hits + cache.misses - lookups <= 1
        answered: list[float] = []
        held.add_done_callback(lambda _: answered.append(time.monotonic()))
        await set_offset(store, target, 7)
        changed = time.monotonic()  # the change is in Redis (and published) from here
        status, body, new_etag = await asyncio.wait_for(held, 5)
        assert status == 200 and b'"0":7' in body and new_etag != etag
        assert answered[0] - changed < 0.1, f"answered {answered[0] - changed:.3f} s after"
        assert len(api.app[WAITERS]) == 0


async def test_a_held_get_ends_with_304_when_nothing_changes(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    path = f"/api/v1/batches/{PIPELINE}/{target}"
    async with cached_api(test_settings) as api:
        _, _, etag = await _get(api, path)
        started = time.monotonic()
        status, body, tag = await _get(api, path + "?wait=1", **{"If-None-Match": etag})
        assert (status, body, tag) == (304, b"", etag)
        assert time.monotonic() - started >= 0.95
        # Without If-None-Match there is nothing to wait for: answered at once.
        started = time.monotonic()
        assert (await _get(api, path + "?wait=30"))[0] == 200
        assert time.monotonic() - started < 5


async def test_a_batch_deleted_while_held_answers_404(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    path = f"/api/v1/batches/{PIPELINE}/{target}"
    async with cached_api(test_settings) as api:
        _, _, etag = await _get(api, path)
        held = asyncio.create_task(_get(api, path + "?wait=20", **{"If-None-Match": etag}))
        await eventually(lambda: len(api.app[WAITERS]) == 1, timeout=5)
        await store.hide(PIPELINE, target)
        status, _, _ = await asyncio.wait_for(held, 5)
        assert status == 404


@pytest.mark.parametrize("wait", ["0", "61", "abc", "1e999", "nan", "²"])
async def test_a_bad_wait_is_a_400(test_settings: Settings, redis: Redis, wait: str) -> None:
    store = direct_store(redis, test_settings)
    [target] = await new_batches(store)
    async with cached_api(test_settings) as api:
        response = await api.get(f"/api/v1/batches/{PIPELINE}/{target}",
                                 params={"wait": wait}, headers={**AUTH, "If-None-Match": '"x"'})
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "bad_request"


async def test_a_held_latest_answers_when_a_newer_batch_is_created(
        test_settings: Settings, redis: Redis) -> None:
    store = direct_store(redis, test_settings)
    [first] = await new_batches(store)
    latest = f"/api/v1/batches/{PIPELINE}"
    async with cached_api(test_settings) as api:
        _, body, etag = await _get(api, latest)
        assert orjson.loads(body)["id"] == first
        held = asyncio.create_task(_get(api, latest + "?wait=20", **{"If-None-Match": etag}))
        await eventually(lambda: len(api.app[WAITERS]) == 1, timeout=5)
        assert not held.done()
        [second] = await new_batches(store)
        status, body, new_etag = await asyncio.wait_for(held, 5)
        assert status == 200 and orjson.loads(body)["id"] == second and new_etag != etag
        # And with nothing new, the wait ends with 304.
        status, _, _ = await _get(api, latest + "?wait=1", **{"If-None-Match": new_etag})
        assert status == 304
