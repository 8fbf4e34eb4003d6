"""POST of a pipeline's latest version: the create script checks the version it records is
still the latest (core.api_scripts.CREATE_LATEST_BATCH), so the API keeps its last-seen latest
version instead of reading it per request, and a version registered elsewhere (another API
process) is still the one the next POST runs."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any, cast

import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core import keys
from core.api_scripts import ApiScripts
from core.codec import decode_command
from core.registry import PipelineRegistry
from core.scripts import Scripts
from core.settings import Settings
from core.store import BatchStore
from service.appkeys import REDIS
from tests.helpers import AUTH, api_client, api_settings, create_call, read_topic, spec, spec_body
from tests.test_perf_turns import CountingPipelines

Client = TestClient[Any, Any]


@pytest.fixture
async def api(topics: Settings, redis: Redis) -> AsyncIterator[Client]:
    async with api_client(api_settings(topics)) as client:
        response = await client.put("/api/v1/pipelines/pipeline-sales", json=spec_body(),
                                    headers=AUTH)
        assert response.status == 201
        yield client


async def post(api: Client, **params: str) -> str:
    response = await api.post("/api/v1/batches/pipeline-sales", params=params, headers=AUTH)
    assert response.status == 200, await response.text()
    return str((await response.json())["item"])


async def version_of(api: Client, batch_id: str) -> tuple[str, list[str]]:
    batch = await (await api.get(f"/api/v1/batches/pipeline-sales/{batch_id}",
                                 headers=AUTH)).json()
    return batch["pipeline_version"], list(batch["state"]["steps"])


async def test_a_version_registered_by_another_process_is_the_next_posts_latest(
        api: Client, topics: Settings, redis: Redis) -> None:
    first = await post(api)
    assert await version_of(api, first) == ("1", ["extract", "transform", "load"])
    # Registered straight in Redis: this API process is not told, its last-seen latest is 1.
    other = PipelineRegistry(redis, Scripts(redis))
    await other.register("pipeline-sales", spec(version="2", steps=("extract", "load")))
    second = await post(api)
    assert await version_of(api, second) == ("2", ["extract", "load"])
    # Asked for by name, an older version is still recorded as it is.
    pinned = await post(api, pipeline_version="1")
    assert await version_of(api, pinned) == ("1", ["extract", "transform", "load"])

    records = await read_topic(topics, topics.topic_commands, lambda rs: sum(
        decode_command(r.value).type == "run" for r in rs) >= 3)
    runs = {c.batch_id: c.pipeline_version for c in map(decode_command, (r.value for r in records))
            if c.type == "run"}
    assert runs == {first: "1", second: "2", pinned: "1"}


async def test_posts_of_a_known_pipeline_cost_one_round_trip_per_turn(
        api: Client, redis: Redis) -> None:
    await post(api)  # the latest version is known from here on
    counter = CountingPipelines(api.app[REDIS])
    ids = await asyncio.gather(*(post(api) for _ in range(10)))
    assert len(set(ids)) == 10
    # Only creates: no "which version is latest" read of their own.
    assert sum(counter.sizes) == 10, counter.sizes
    for batch_id in ids:
        assert await version_of(api, batch_id) == ("1", ["extract", "transform", "load"])


async def test_the_script_creates_as_the_stores_own_and_refuses_a_version_not_latest(
        redis: Redis) -> None:
    scripts, api_scripts = Scripts(redis), ApiScripts(redis)
    store = BatchStore(redis, scripts, token_secret=b"t")
    order = keys.pipeline_order("p")
    # The store's own create, to compare the hash with.
    await store.create("p", "batch-a", spec())
    batch_keys, args = await create_call(redis, "p", "batch-b", spec())

    async def create(version: str) -> Any:
        return await api_scripts.create_latest_batch(
            keys=[*batch_keys, order], args=[version, orjson.dumps(args)])

    assert await create("1") == [None]  # no version registered at all
    await redis.rpush(order, "1", "2")
    assert await create("1") == ["2"]
    assert not await redis.exists(keys.batch("p", "batch-b"))
    assert await create("2") == 2  # the store's sequence, after batch-a's 1
    assert await create("2") == 0  # exists already, as CREATE_BATCH answers
    assert await create("") == 0  # '' for no check: the same create

    a = await redis.hgetall(keys.batch("p", "batch-a"))
    b = await redis.hgetall(keys.batch("p", "batch-b"))
    for fields in (a, b):
        for name in ("id", "created_at", "updated_at", "seq"):
            fields.pop(name)
    assert a == b
    assert await redis.zrange(keys.batch_index("p"), 0, -1) == ["batch-a", "batch-b"]

    # Given the change channel, a new batch publishes its key (the pipeline's streams see it
    # at once); a create that created nothing publishes nothing.
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(keys.CHANGES_CHANNEL)
    try:
        await pubsub.get_message(timeout=5)  # the subscription's confirmation
        new_keys = [keys.batch("p", "batch-c")]
        for n, batch_id in enumerate(("batch-c", "batch-c")):
            created = await api_scripts.create_latest_batch(
                keys=[keys.batch("p", batch_id), *batch_keys[1:], order],
                args=["2", orjson.dumps([batch_id, *args[1:]]), keys.CHANGES_CHANNEL])
            assert (created != 0) is (n == 0)
        mine: list[str] = []
        while (message := await pubsub.get_message(timeout=0.5)) is not None:
            if message["data"] in new_keys:  # the channel is server-wide
                mine.append(message["data"])
        assert mine == new_keys
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed since redis 8.2


async def test_the_script_refuses_a_latest_whose_definition_is_not_the_one_read(
        redis: Redis) -> None:
    """ARGV[4]: the SHA-1 of the definition as read. Registered again after Redis lost it,
    a version may hold another definition under the same name: the create answers
    {latest, 'changed'} and creates nothing; '' checks nothing."""
    api_scripts = ApiScripts(redis)
    batch_keys, args = await create_call(redis, "p", "batch-d", spec())
    versions = keys.pipeline_versions("p")
    order = keys.pipeline_order("p")
    await redis.rpush(order, "1")
    await redis.hset(versions, "1", '{"read": "before"}')
    read = hashlib.sha1(b'{"read": "before"}', usedforsecurity=False).hexdigest()

    async def create(digest: str) -> Any:
        return await api_scripts.create_latest_batch(
            keys=[*batch_keys, order, keys.unsent_runs("p"), versions],
            args=["1", orjson.dumps(args), "", digest])

    await redis.hset(versions, "1", '{"registered": "again"}')
    assert await create(read) == ["1", "changed"]
    assert not await redis.exists(keys.batch("p", "batch-d"))
    await redis.hset(versions, "1", '{"read": "before"}')
    assert await create(read) == 1
    await redis.hset(versions, "1", '{"registered": "again"}')
    assert await create("") == 0  # no check: the create (the batch exists by now)


async def test_a_posted_batch_is_recorded_as_the_stores_create_records_one(
        api: Client, redis: Redis) -> None:
    # The POST fills a layout captured from BatchStore.create once per definition: each
    # batch still gets its own id and times, and every other field is the store's (with
    # the registered config as the batch's effective one: a POST without a body).
    first, second = await post(api), await post(api)
    registered: dict[str, dict[str, Any]] = {"extract": {}, "transform": {}, "load": {}}
    await BatchStore(redis, Scripts(redis), token_secret=b"t").create(
        "pipeline-sales", "batch-direct", spec(), extra={"config": orjson.dumps(registered).decode()})
    direct, *posted = [cast(dict[str, str], await redis.hgetall(keys.batch("pipeline-sales", b)))
                       for b in ("batch-direct", first, second)]
    assert [p["id"] for p in posted] == [first, second]
    assert [p["seq"] for p in [*posted, direct]] == ["1", "2", "3"]
    for fields in posted:
        assert fields["created_at"] == fields["updated_at"]
        assert fields["created_at"][:4] == direct["created_at"][:4]
        assert fields["created_at"] <= direct["created_at"]
    for fields in (direct, *posted):
        for name in ("id", "created_at", "updated_at", "seq"):
            fields.pop(name)
    assert posted == [direct, direct]
