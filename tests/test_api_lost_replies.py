"""The API when Redis runs a write and its reply is lost (the client reconnects and sends the
command again, as redis-py's retry does): the request still answers what happened, and
nothing is left half done. A proxy in front of the shared Redis loses the reply
(tests/reply_loss_proxy.py)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from core import keys
from core.api_scripts import CLAIM_KEY, CREATE_LATEST_BATCH
from core.codec import decode_command
from core.list_scripts import HIDE_BATCH, PURGE_BATCH
from core.models import new_batch_id
from core.settings import Settings
from core.store import BatchStore
from service.appkeys import ABANDONER
from service.turns import TurnReads
from tests.conftest import eventually
from tests.helpers import AUTH, api_client, api_settings, read_topic, spec, spec_body
from tests.reply_loss_proxy import ReplyLossProxy

Client = TestClient[Any, Any]


def _sha(script: str) -> bytes:
    return hashlib.sha1(script.encode()).hexdigest().encode()


@pytest.fixture
async def proxy(test_settings: Settings) -> AsyncIterator[ReplyLossProxy]:
    url = urlsplit(test_settings.redis_url)
    async with ReplyLossProxy(url.hostname or "127.0.0.1", url.port or 6379) as p:
        yield p


@pytest.fixture
async def api(topics: Settings, redis: Redis, proxy: ReplyLossProxy) -> AsyncIterator[Client]:
    db = urlsplit(topics.redis_url).path
    settings = api_settings(topics, redis_url=f"redis://127.0.0.1:{proxy.port}{db}")
    async with api_client(settings) as client:
        response = await client.put("/api/v1/pipelines/p", json=spec_body(), headers=AUTH)
        assert response.status == 201
        yield client


async def _commands(settings: Settings, kind: str, count: int) -> list[str]:
    """The batch ids of the first `count` commands of `kind` on the commands topic."""
    def of_kind(records: list[Any]) -> list[str]:
        return [c.batch_id for c in map(decode_command, (r.value for r in records))
                if c.type == kind]

    records = await read_topic(settings, settings.topic_commands,
                               lambda rs: len(of_kind(rs)) >= count)
    return of_kind(records)


async def test_a_post_whose_create_reply_is_lost_answers_its_batch_and_runs_it(
        api: Client, redis: Redis, proxy: ReplyLossProxy, topics: Settings) -> None:
    await redis.script_load(CREATE_LATEST_BATCH)  # so the POST's EVALSHA is what runs it
    proxy.arm(_sha(CREATE_LATEST_BATCH))
    response = await api.post("/api/v1/batches/p", headers=AUTH)
    assert proxy.fired == 1
    assert response.status == 200, await response.text()
    batch_id = (await response.json())["item"]
    # Created once (the retry found it), listed once, and its run command queued.
    assert await redis.get(keys.batch_seq("p")) == "1"
    page = await (await api.get("/api/v1/batches/p/", headers=AUTH)).json()
    assert list(page["items"]) == [batch_id]
    assert page["items"][batch_id]["state"]["state"] == "pending"
    assert await _commands(topics, "run", 1) == [batch_id]


async def test_a_claim_whose_reply_is_lost_is_this_requests_own(
        api: Client, redis: Redis, proxy: ReplyLossProxy, topics: Settings) -> None:
    await redis.script_load(CLAIM_KEY)
    proxy.arm(b'"s":"pending"')  # the claim's record
    headers = {**AUTH, "Idempotency-Key": "fresh-key"}
    response = await api.post("/api/v1/batches/p", headers=headers)
    assert proxy.fired == 1
    assert response.status == 200, await response.text()  # was a 409 in_progress
    batch_id = (await response.json())["item"]
    again = await api.post("/api/v1/batches/p", headers=headers)
    assert (again.status, await again.json()) == (200, {"item": batch_id})
    assert await _commands(topics, "run", 1) == [batch_id]


async def test_a_delete_queued_answers_success_though_redis_fails_to_hide_the_batch(
        api: Client, redis: Redis, proxy: ReplyLossProxy, topics: Settings) -> None:
    response = await api.post("/api/v1/batches/p", headers=AUTH)
    batch_id = (await response.json())["item"]
    await redis.script_load(HIDE_BATCH)
    # Redis goes away as the hide is sent, after Kafka took the delete command.
    proxy.arm(_sha(HIDE_BATCH), outage=True)
    deleted = await api.delete(f"/api/v1/batches/p/{batch_id}", headers=AUTH)
    proxy.restore()
    assert proxy.fired == 1
    # The delete command is durable, so the batch goes whatever the hide did (the commands
    # consumer hides and purges it): the answer says so, not a 503 telling the client
    # nothing changed.
    assert deleted.status == 200, await deleted.text()
    assert await _commands(topics, "delete", 1) == [batch_id]
    assert await redis.hget(keys.batch("p", batch_id), "deleted") is None  # not by the API


async def test_a_create_whose_answer_never_comes_is_undone(
        api: Client, redis: Redis, topics: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    # Redis runs the create and every try to hear its answer fails (the client's retries
    # exhausted): the POST cannot say it succeeded, so nothing of it may stay.
    real = TurnReads.script

    async def answer_lost(self: TurnReads, script: Any, keys_: list[str], args: list[Any]) -> Any:
        await real(self, script, keys_, args)
        raise RedisConnectionError("connection reset before the reply")

    monkeypatch.setattr(TurnReads, "script", answer_lost)
    response = await api.post("/api/v1/batches/p", headers=AUTH)
    monkeypatch.undo()
    assert response.status == 503, await response.text()
    assert await redis.get(keys.batch_seq("p")) == "1"  # it did run
    assert await redis.zcard(keys.batch_index("p")) == 0
    assert await redis.keys(keys.batch("p", "*")) == []
    page = await (await api.get("/api/v1/batches/p/", headers=AUTH)).json()
    assert page["items"] == {}


async def test_a_failed_create_is_undone_once_redis_answers_again(
        api: Client, redis: Redis, proxy: ReplyLossProxy, test_settings: Settings) -> None:
    # The create ran, its answer was lost and Redis is unreachable by the time of the undo:
    # the API process purges the batch as soon as Redis answers again.
    batch_id = new_batch_id()
    await BatchStore.from_settings(redis, test_settings).create("p", batch_id, spec())
    await redis.script_load(PURGE_BATCH)
    proxy.arm(_sha(PURGE_BATCH), outage=True)
    abandoner = api.app[ABANDONER]
    await abandoner.undo("p", batch_id)
    assert abandoner.undoing() == 1
    assert await redis.exists(keys.batch("p", batch_id)) == 1
    proxy.restore()
    await eventually(lambda: abandoner.undoing() == 0, timeout=15)
    assert await redis.exists(keys.batch("p", batch_id)) == 0
    assert await redis.zscore(keys.batch_index("p"), batch_id) is None
