"""The same key twice in one JSON object of a request body: refused with a 400, at any depth,
rather than the last one silently winning (which can hide an invalid value)."""

from __future__ import annotations

import orjson
import pytest
from redis.asyncio import Redis

from core.settings import Settings
from service.run_body import duplicate_key
from tests.helpers import AUTH, api_client, api_settings, spec_body

DUPLICATES = [
    ("POST", "/api/v1/batches/dup-keys",
     b'{"config": {"extract": {"rows": 7}, "extract": {"seed": 1}}}'),
    # The value kept would be valid: the one dropped is not.
    ("POST", "/api/v1/batches/dup-keys",
     b'{"config": {"extract": {"rows": 99999999999}, "extract": {}}}'),
    ("POST", "/api/v1/batches/dup-keys", b'{"config": {}, "config": {}}'),
    ("PUT", "/api/v1/pipelines/dup-keys2",
     b'{"name": "dup", "version": "1", "version": "2", "steps": '
     b'[{"name": "extract", "uses": "sales.extract", "config": {}}]}'),
    ("PUT", "/api/v1/pipelines/dup-keys2",
     b'{"name": "dup", "version": "1", "steps": '
     b'[{"name": "extract", "uses": "sales.extract", "config": {"rows": 1, "rows": 2}}]}'),
    # The same parameter twice, as the list's filters refuse it (a run took the first).
    ("POST", "/api/v1/batches/dup-keys?pipeline_version=1&pipeline_version=2", b""),
]


@pytest.mark.parametrize(("method", "path", "body"), DUPLICATES)
async def test_a_duplicate_key_or_parameter_is_400_and_changes_nothing(
        topics: Settings, redis: Redis, method: str, path: str, body: bytes) -> None:
    async with api_client(api_settings(topics)) as api:
        put = await api.put("/api/v1/pipelines/dup-keys", json=spec_body(), headers=AUTH)
        assert put.status == 201
        before = sorted(await redis.keys("*"))
        response = await api.request(method, path, data=body,
                                     headers={**AUTH, "Content-Type": "application/json"})
        answer = await response.read()
        after = sorted(await redis.keys("*"))
    assert response.status == 400, (response.status, answer[:300])
    assert orjson.loads(answer)["error"]["code"] == "bad_request"
    assert after == before


@pytest.mark.parametrize(("raw", "key"), [
    (b'{"a": 1, "b": {"c": 1, "c": 2}}', "c"),
    (b'[{"a": 1}, {"x": [{"k": 1, "k": 1}]}]', "k"),
    (b'{"u": "12:00", "a": {"t": "x:y", "t": 3}}', "t"),  # colons in strings: the slow path
    (b'{"big": 123456789012345678901234567890, "b": 1, "b": 2}', "b"),  # orjson refuses it
    (b'{"a\\u0062": 1, "ab": 2}', "ab"),  # the same key, spelled with an escape
    (b'{"a": "\\u003a", "b": 1, "b": 2}', "b"),  # a colon the bytes do not show
    (b'{"a:b": "c:d", "e": {"a:b": "c:d"}}', None),
    (b'{"u": "12:00", "a": {"t": "x:y"}}', None),
    (b'{"a": {"a": {"a": 1}}, "b": [{"a": 2}, {"a": 3}]}', None),
    (b'{"a": 1,', None),  # not JSON: the model's parser says why
])
def test_duplicate_key_finds_a_key_given_twice_in_one_object(raw: bytes, key: str | None) -> None:
    assert duplicate_key(raw) == key


def test_duplicate_key_takes_nesting_orjson_writes_no_more() -> None:
    deep = b'{"a": ' * 300 + b'{"k": 1, "k": 2}' + b"}" * 300
    assert duplicate_key(deep) == "k"
    assert duplicate_key(deep.replace(b'"k": 2', b'"j": 2')) is None
