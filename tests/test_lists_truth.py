"""The list's answers under odd-but-legal use: a query parameter the list does not take is
refused, not ignored (an ignored filter listed every batch as if filtered; a cache-buster,
`_` first, is still ignored)."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core import keys
from core.settings import Settings
from core.store import BatchStore
from tests.helpers import AUTH, api_client, api_settings, spec

Client = TestClient[Any, Any]
P = "p"


async def make(store: BatchStore, n: int) -> list[str]:
    """n batches, named in creation order (newest first is reverse name order)."""
    ids = [f"b{k:03d}" for k in range(n)]
    for batch_id in ids:
        await store.create(P, batch_id, spec())
    return ids


@pytest.mark.parametrize("query", [
    "pipeline_version=1",            # the POST's parameter: no version filter on the list
    "status=running",                # a misspelt filter
    "created_since=2030-01-01T00:00:00Z",
    "limit=2&page_token=x",          # another API's token name: the first page again
    "wait=5",
])
async def test_a_parameter_the_list_does_not_take_is_a_400_naming_it(
        topics: Settings, redis: Redis, query: str) -> None:
    store = BatchStore.from_settings(redis, topics)
    await make(store, 3)
    name = query.split("&")[-1].split("=")[0]
    async with api_client(api_settings(topics)) as api:
        for accept in ("application/json", "text/event-stream"):
            response = await api.get(f"/api/v1/batches/{P}/?{query}",
                                     headers={**AUTH, "Accept": accept})
            assert (response.status, response.content_type) == (400, "application/json"), (
                query, accept)
            error = (await response.json())["error"]
            response.close()
            assert error["code"] == "bad_request"
            assert name in error["message"] and "created_before" in error["message"], error
        # The parameters it takes still pass, and a cache-buster is still ignored.
        ok = await api.get(f"/api/v1/batches/{P}/?limit=1&state=pending"
                           "&created_after=2000-01-01T00:00:00Z&_=1733234", headers=AUTH)
        assert ok.status == 200 and list((await ok.json())["items"]) == ["b002"]


async def test_a_created_bound_finer_than_a_microsecond_is_not_cut_short(
        topics: Settings, redis: Redis) -> None:
    """Python reads six digits of a fraction and drops the rest: `created_after=...00.0000009Z`
    listed a batch created at `...00.000Z` (before it), `created_before` the same time left it
    out (it is before it). An offset's fraction counts too, the other way for a `+` offset:
    `...00+00:00:00.0000007` is just before `...00.000Z`; its fraction was taken for the
    time's, and the bound rounded a millisecond up."""
    store = BatchStore.from_settings(redis, topics)
    await make(store, 1)
    await redis.hset(keys.batch(P, "b000"), mapping={"created_at": "2030-01-01T00:00:00.000Z"})
    async with api_client(api_settings(topics)) as api:
        for query, listed in (("created_after=2030-01-01T00:00:00.0000009Z", []),
                              ("created_before=2030-01-01T00:00:00.0000009Z", ["b000"]),
                              ("created_after=2030-01-01T00:00:00.000000000Z", ["b000"]),
                              ("created_before=2030-01-01T00:00:00.000000000%2B00:00", []),
                              ("created_after=2029-12-31T23:59:59.9999999999Z", ["b000"]),
                              ("created_before=2029-12-31T23:59:59.9999999999Z", []),
                              ("created_after=2030-01-01T00:00:00%2B00:00:00.0000007", ["b000"]),
                              ("created_before=2030-01-01T00:00:00%2B00:00:00.0000007", []),
                              ("created_after=2030-01-01T00:00:00-00:00:00.0000007", []),
                              ("created_before=2030-01-01T00:00:00-00:00:00.0000007", ["b000"]),
                              ("created_after=2030-01-01T00:00:00.0000007%2B00:00:00.0000007",
                               ["b000"])):
            response = await api.get(f"/api/v1/batches/{P}/?{query}", headers=AUTH)
            assert response.status == 200, (query, await response.text())
            assert list((await response.json())["items"]) == listed, query


async def test_a_window_with_no_millisecond_in_it_is_empty_not_refused(
        topics: Settings, redis: Redis) -> None:
    """created_after=...00.0001Z&created_before=...00.0009Z is a valid window (after is
    earlier) holding no millisecond `created_at` can have: it was a 400 saying created_after
    was not earlier than created_before (both bounds round to .001)."""
    store = BatchStore.from_settings(redis, topics)
    await make(store, 1)
    await redis.hset(keys.batch(P, "b000"), mapping={"created_at": "2030-01-01T00:00:00.000Z"})
    async with api_client(api_settings(topics)) as api:
        for after, before in (("00.0001Z", "00.0009Z"), ("00.00000001Z", "00.00000009Z")):
            response = await api.get(f"/api/v1/batches/{P}/?created_after=2030-01-01T00:00:{after}"
                                     f"&created_before=2030-01-01T00:00:{before}", headers=AUTH)
            assert (response.status, await response.json()) == (200, {"items": {},
                                                                      "token": None}), after
        # Not earlier (the same instant, or later, written however) is still a 400.
        for after, before in (("2030-01-01T00:00:00.0001Z", "2030-01-01T01:00:00.0001%2B01:00"),
                              ("2030-01-01T00:00:00.00000009Z", "2030-01-01T00:00:00.00000001Z")):
            response = await api.get(f"/api/v1/batches/{P}/?created_after={after}"
                                     f"&created_before={before}", headers=AUTH)
            assert response.status == 400, after
            assert "earlier" in (await response.json())["error"]["message"]


@pytest.mark.parametrize("query", ["state=running", "outcome=failed", "limit=1",
                                   "created_before=2000-01-01T00:00:00Z", "token=x",
                                   "status=running", "pipeline_version=1"])
async def test_the_latest_batch_refuses_the_lists_filters_instead_of_ignoring_them(
        topics: Settings, redis: Redis, query: str) -> None:
    """`GET /batches/p?state=running` answered the newest batch, pending, as if it were the
    newest running one; a misspelt filter (`status=`) or the POST's `pipeline_version=` as
    if applied."""
    store = BatchStore.from_settings(redis, topics)
    await make(store, 2)
    async with api_client(api_settings(topics)) as api:
        response = await api.get(f"/api/v1/batches/{P}?{query}", headers=AUTH)
        assert response.status == 400, await response.text()
        error = (await response.json())["error"]
        assert error["code"] == "bad_request" and query.split("=")[0] in error["message"]
        # What it takes: none of them, a cache-buster, a long-poll's wait.
        for ok_query in ("", "?_=1733234", "?wait=1"):
            ok = await api.get(f"/api/v1/batches/{P}{ok_query}", headers=AUTH)
            assert ok.status == 200, ok_query
            assert (await ok.json())["id"] == "b001"


async def test_a_token_altered_outside_its_signature_is_refused(
        topics: Settings, redis: Redis) -> None:
    """The token's body was decoded by a decoder that skips characters it does not know,
    extra padding and unused bits, and the signature checked over the decoded bytes: altered
    copies of a token were taken as it (a token is opaque; any other value is a 400)."""
    store = BatchStore.from_settings(redis, topics)
    await make(store, 3)
    async with api_client(api_settings(topics)) as api:
        first = await api.get(f"/api/v1/batches/{P}/", params={"limit": "1"}, headers=AUTH)
        token = (await first.json())["token"]
        body, signature = token.split(".", 1)
        altered = [
            body[:2] + "!" + body[2:] + "." + signature,        # a character base64 drops
            body[:5] + " \t" + body[5:] + "." + signature,      # whitespace inside
            body + "===." + signature,                          # padding the issuer never writes
        ]
        answers = {}
        for other in altered:
            assert other != token
            response = await api.get(f"/api/v1/batches/{P}/",
                                     params={"limit": "1", "token": other}, headers=AUTH)
            answers[other] = (response.status, list((await response.json()).get("items", {})))
        # Each is "any other value": a 400, as a forged signature is.
        assert all(status == 400 for status, _ in answers.values()), answers
