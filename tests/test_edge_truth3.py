"""The edge telling the truth, third review: what `/metrics` says of held requests and of
reads while the cache is off, how long a stream outlives its token, and a webhook secret
that is empty."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from redis.asyncio import Redis

from core.settings import Settings
from service.appkeys import WAITERS
from service.webhook import signature
from tests.cache_support import PIPELINE, cached_api, direct_store, engines, new_batches
from tests.conftest import eventually
from tests.helpers import AUTH, api_client, api_settings, bearer, read_topic
from tests.test_api_auth import hs_token
from tests.test_api_webhook import CAPTURED

Client = TestClient[Any, Any]


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    yield from engines("redis", "kafka")


async def scrape(api: Client) -> dict[str, Any]:
    response = await api.get("/metrics", headers=AUTH)
    assert response.status == 200
    return {f.name: f for f in text_string_to_metric_families(await response.text())}


async def test_a_held_long_poll_of_the_latest_batch_is_counted_as_a_long_poll(
        test_settings: Settings, redis: Redis) -> None:
    """`dhub_open_streams{kind}` is "open push streams and held long-poll GETs, by kind". A
    long-poll of a pipeline's latest batch (`If-None-Match` + `?wait=`) waits on the same
    kind of watch as a pipeline's stream, and was counted as one: 100 pollers of the latest
    batch read as 100 open pipeline streams and no long-poll at all."""
    store = direct_store(redis, test_settings)
    await new_batches(store)
    latest = f"/api/v1/batches/{PIPELINE}"
    async with cached_api(test_settings) as api:
        etag = (await api.get(latest, headers=AUTH)).headers["ETag"]
        # Held far longer than the scrape can take on a slow machine, then let go.
        held = asyncio.create_task(api.get(latest + "?wait=60",
                                           headers={**AUTH, "If-None-Match": etag}))
        await eventually(lambda: len(api.app[WAITERS]) == 1, timeout=5)
        families = await scrape(api)
        held.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await held
    kinds = {s.labels["kind"]: s.value for s in families["dhub_open_streams"].samples}
    assert kinds == {"long_poll": 1, "batch_stream": 0, "pipeline_stream": 0}, kinds


async def test_reads_made_while_the_cache_is_off_count_as_misses(
        test_settings: Settings, redis: Redis) -> None:
    """`dhub_cache_misses` is "batch reads that read Redis". With the cache off (its feed
    down, or DHUB_API_CACHE=false) every read goes to Redis, and none was counted: hits and
    misses both stood still, as if the API served no batch at all."""
    store = direct_store(redis, test_settings)
    [batch_id] = await new_batches(store)
    async with api_client(api_settings(test_settings, api_cache=False)) as api:
        for _ in range(3):
            response = await api.get(f"/api/v1/batches/{PIPELINE}/{batch_id}", headers=AUTH)
            assert response.status == 200
        families = await scrape(api)
    [misses] = families["dhub_cache_misses"].samples
    [hits] = families["dhub_cache_hits"].samples
    assert (hits.value, misses.value) == (0, 3)


async def _read_until_closed(response: aiohttp.ClientResponse, within: float) -> bytes:
    """The stream's bytes until the server ends it; raises TimeoutError if it is still open
    after `within` seconds."""
    body = b""
    async with asyncio.timeout(within):
        try:
            while chunk := await response.content.readany():
                body += chunk
        except aiohttp.ClientPayloadError:  # cut: the connection closed mid-body
            pass
    return body


@pytest.mark.parametrize("kind", ["batch", "pipeline"])
async def test_a_stream_ends_when_its_token_expires(
        test_settings: Settings, redis: Redis, kind: str) -> None:
    """A JWT is refused once past its `exp`, but a stream opened with it went on sending for
    as long as the client kept it open (a pipeline stream: for ever): a token expired, or
    one whose holder should no longer read, still read every change. The stream now closes
    at the token's `exp` (cut, not `end`: the batch did not end), and the client's reconnect
    needs a valid token."""
    store = direct_store(redis, test_settings)
    [batch_id] = await new_batches(store)
    path = (f"/api/v1/batches/{PIPELINE}/{batch_id}" if kind == "batch"
            else f"/api/v1/batches/{PIPELINE}/")
    ttl = 4
    token = hs_token("batches:read", ttl=ttl)
    headers = {**bearer(token), "Accept": "text/event-stream"}
    async with cached_api(test_settings) as api:
        opened = time.monotonic()
        response = await api.get(path, headers=headers)
        assert response.status == 200, await response.text()
        body = await _read_until_closed(response, within=ttl + 6)
        assert b"event: batch" in body and b"event: end" not in body, body
        assert time.monotonic() - opened >= ttl - 1.5  # not cut at once
        again = await api.get(path, headers=headers)
        assert again.status == 401


async def test_an_empty_webhook_secret_disables_the_webhook(topics: Settings,
                                                            redis: Redis) -> None:
    """`DHUB_WEBHOOK_SECRET=` (how an env file often writes "unset") reads as an empty
    secret, not as none: the webhook was on, and a call signed with the empty key, which
    anybody can compute, was accepted (202) and its event forwarded. In `local` nothing
    refuses a short secret at start."""
    body = orjson.dumps(CAPTURED["flow_run_completed"])
    ts = str(int(time.time()))
    headers = {"X-Dhub-Timestamp": ts, "X-Dhub-Signature": signature(b"", ts, body),
               "Content-Type": "application/json"}
    async with api_client(api_settings(topics, webhook_secret=SecretStr(""))) as api:
        response = await api.post("/api/v1/hooks/prefect", data=body, headers=headers)
        assert response.status == 401, await response.text()
    with pytest.raises(TimeoutError):
        await read_topic(topics, topics.topic_events, lambda rs: len(rs) >= 1, 1)


async def test_a_token_whose_exp_no_float_can_hold_is_a_401_not_a_500(
        test_settings: Settings, redis: Redis) -> None:
    """PyJWT takes any `exp` `int()` takes; the stream's cut at `exp` read it as a float, and
    an `exp` of 10**400 raised OverflowError: a 500 for a token to refuse."""
    token = hs_token("batches:read", exp=10**400)
    async with cached_api(test_settings) as api:
        response = await api.get(f"/api/v1/batches/{PIPELINE}", headers=bearer(token))
        assert response.status == 401, await response.text()
        assert "exp" in (await response.json())["error"]["message"]
