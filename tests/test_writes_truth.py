"""The API's writes under faults: each answer says what then happens, and an Idempotency-Key
is answered by what its first attempt did."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from typing import Any, cast
from urllib.parse import urlsplit

import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from core import keys
from core.api_scripts import COMMIT_KEY, CREATE_LATEST_BATCH, RELEASE_KEY, ApiScripts
from core.codec import Command, decode_command
from core.list_scripts import PURGE_BATCH
from core.models import new_batch_id
from core.settings import Settings
from core.store import BatchStore
from service.abandon import STOPS, Abandoner
from service.appkeys import COMMANDS
from service.command_sender import CommandSender, Refused
from service.idempotency import IdempotencyKeys
from tests.conftest import eventually, free_port
from tests.helpers import AUTH, api_client, api_settings, read_topic, spec, spec_body
from tests.reply_loss_proxy import ReplyLossProxy
from tests.write_faults_proxy import KafkaProxy

Client = TestClient[Any, Any]


@pytest.fixture
async def api(topics: Settings, redis: Redis, proxy: KafkaProxy) -> AsyncIterator[Client]:
    settings = api_settings(topics, kafka_bootstrap=proxy.address)
    async with api_client(settings) as client:
        response = await client.put("/api/v1/pipelines/p", json=spec_body(), headers=AUTH)
        assert response.status == 201
        yield client


def _of(records: list[Any], batch_id: str) -> list[str]:
    return [c.type for c in map(decode_command, (r.value for r in records))
            if c.batch_id == batch_id]


# -- Kafka writes a command and its answer is lost ------------------------------------------
# The API's producer talks to the shared broker through a proxy the test mutes (the broker
# writes what it is sent, its answers are lost: tests/write_faults_proxy.py).


async def test_a_stop_kafka_did_not_confirm_is_answered_as_what_happens(
        api: Client, proxy: KafkaProxy, redis: Redis, topics: Settings) -> None:
    posted = await api.post("/api/v1/batches/p", headers=AUTH)
    assert posted.status == 200
    batch_id = (await posted.json())["item"]

    proxy.mute()  # the broker writes the stop command; its answer is lost
    stopped = await api.put(f"/api/v1/batches/p/{batch_id}/stop", headers=AUTH)
    body = await stopped.json()
    proxy.restore()
    # The stop may be on the topic (it is, here), so it will happen: a 503 ("unavailable,
    # retry later") told the client its batch runs on, and then it stopped. The answer is
    # the stop's acceptance, the command queued again until Kafka confirms one.
    assert stopped.status == 200, body
    assert body == {"message": "Batch stopped successfully"}
    records = await read_topic(topics, topics.topic_commands,
                               lambda rs: _of(rs, batch_id).count("stop") >= 2, timeout=30)
    assert _of(records, batch_id)[0] == "run"

    async def sent_out() -> bool:
        return await redis.zcard(keys.ABANDONED) == 0 and not await redis.keys(
            f"{keys.ABANDONED}*")

    await eventually(sent_out, timeout=15)


# -- Idempotency-Key transitions Redis did not take ------------------------------------------
# A proxy in front of the shared Redis makes it unreachable from a chosen command on
# (tests/reply_loss_proxy.py).


@pytest.fixture
async def redis_proxy(test_settings: Settings) -> AsyncIterator[ReplyLossProxy]:
    url = urlsplit(test_settings.redis_url)
    async with ReplyLossProxy(url.hostname or "127.0.0.1", url.port or 6379) as p:
        yield p


@pytest.fixture
async def api_via_proxy(topics: Settings, redis: Redis,
                        redis_proxy: ReplyLossProxy) -> AsyncIterator[Client]:
    db = urlsplit(topics.redis_url).path
    settings = api_settings(topics, redis_url=f"redis://127.0.0.1:{redis_proxy.port}{db}")
    async with api_client(settings) as client:
        response = await client.put("/api/v1/pipelines/p", json=spec_body(), headers=AUTH)
        assert response.status == 201
        yield client


def _sha(script: str) -> bytes:
    return hashlib.sha1(script.encode()).hexdigest().encode()


async def test_a_post_answered_503_frees_its_key_once_redis_is_back(
        api_via_proxy: Client, redis: Redis, redis_proxy: ReplyLossProxy,
        topics: Settings) -> None:
    await redis.script_load(CREATE_LATEST_BATCH)
    await redis.script_load(RELEASE_KEY)
    # Redis goes away as the create is sent, after the key's claim: nothing was created, and
    # the release of the key fails as well.
    redis_proxy.arm(_sha(CREATE_LATEST_BATCH), outage=True)
    headers = {**AUTH, "Idempotency-Key": "k-503"}
    first = await api_via_proxy.post("/api/v1/batches/p", headers=headers)
    assert first.status == 503, await first.text()
    redis_proxy.restore()

    async def released() -> bool:
        return await redis.get(keys.idempotency(hashlib.sha256(b"k-503").hexdigest())) is None

    # Nothing is in progress: the retry runs the batch. It answered 409 `in_progress` ("retry
    # later") until the pending record expired, 60 s on.
    await eventually(released, timeout=15)
    again = await api_via_proxy.post("/api/v1/batches/p", headers=headers)
    assert again.status == 200, await again.json()


async def test_a_post_answered_200_keeps_its_key_though_redis_missed_the_commit(
        api_via_proxy: Client, redis: Redis, redis_proxy: ReplyLossProxy,
        topics: Settings) -> None:
    await redis.script_load(COMMIT_KEY)
    redis_proxy.arm(_sha(COMMIT_KEY), outage=True)  # the run command is queued by then
    headers = {**AUTH, "Idempotency-Key": "k-200"}
    first = await api_via_proxy.post("/api/v1/batches/p", headers=headers)
    assert first.status == 200, await first.text()
    batch_id = (await first.json())["item"]
    redis_proxy.restore()

    async def committed() -> bool:
        raw = await redis.get(keys.idempotency(hashlib.sha256(b"k-200").hexdigest()))
        return raw is not None and orjson.loads(raw)["s"] == "committed"

    # A retry (its answer lost) is the same batch: it answered 409 `in_progress` for 60 s,
    # then, the pending record expired, ran a second batch.
    await eventually(committed, timeout=15)
    again = await api_via_proxy.post("/api/v1/batches/p", headers=headers)
    assert (again.status, await again.json()) == (200, {"item": batch_id})


async def test_a_post_kafka_refused_leaves_no_pending_batch_though_redis_missed_the_purge(
        api_via_proxy: Client, redis: Redis, redis_proxy: ReplyLossProxy,
        monkeypatch: pytest.MonkeyPatch) -> None:
    sender = api_via_proxy.app[COMMANDS]

    async def refused(command: Command) -> None:
        # Kafka refuses the run command (not written) and Redis goes away as the batch
        # is purged.
        redis_proxy.arm(_sha(PURGE_BATCH), outage=True)
        raise Refused()

    await redis.script_load(PURGE_BATCH)
    monkeypatch.setattr(sender, "command", refused)
    first = await api_via_proxy.post("/api/v1/batches/p", headers=AUTH)
    monkeypatch.undo()
    assert first.status == 503, await first.text()
    assert redis_proxy.fired == 1
    redis_proxy.restore()

    # No run command was written, so the batch never runs: GET showed it `pending` ("the run
    # command is queued") for good, listed, in the pending index.
    async def gone() -> bool:
        return await redis.zcard(keys.batch_index("p")) == 0
    await eventually(gone, timeout=15)
    assert await redis.keys(keys.batch("p", "*")) == []
    page = await (await api_via_proxy.get("/api/v1/batches/p/", headers=AUTH)).json()
    assert page["items"] == {}


@pytest.fixture
async def api_via_both(topics: Settings, redis: Redis, proxy: KafkaProxy,
                       redis_proxy: ReplyLossProxy) -> AsyncIterator[Client]:
    db = urlsplit(topics.redis_url).path
    settings = api_settings(topics, kafka_bootstrap=proxy.address,
                            redis_url=f"redis://127.0.0.1:{redis_proxy.port}{db}")
    async with api_client(settings) as client:
        response = await client.put("/api/v1/pipelines/p", json=spec_body(), headers=AUTH)
        assert response.status == 201
        yield client


async def test_a_post_answered_503_leaves_no_runnable_batch_though_redis_missed_the_abandon(
        api_via_both: Client, redis: Redis, proxy: KafkaProxy, redis_proxy: ReplyLossProxy,
        topics: Settings) -> None:
    # The API's links both fail (its host's network): Kafka writes the run command and its
    # answer is lost, and Redis is away as the batch is abandoned.
    proxy.mute()
    redis_proxy.arm(keys.ABANDONED.encode(), outage=True)
    first = await api_via_both.post("/api/v1/batches/p", headers=AUTH)
    assert first.status == 503, await first.text()
    assert redis_proxy.fired == 1
    redis_proxy.restore()
    proxy.restore()

    def runs(records: list[Any]) -> list[str]:
        return [c.batch_id for c in map(decode_command, (r.value for r in records))
                if c.type == "run"]

    [batch_id] = runs(await read_topic(topics, topics.topic_commands, lambda rs: bool(runs(rs))))
    # The run command is on the topic: the batch stayed visible, `pending`, and the commands
    # consumer would run it, after a 503 that a retry answers with a second batch.
    async def hidden() -> bool:
        return await redis.hget(keys.batch("p", batch_id), "deleted") is not None
    await eventually(hidden, timeout=15)
    records = await read_topic(topics, topics.topic_commands,
                               lambda rs: "delete" in _of(rs, batch_id), timeout=30)
    assert _of(records, batch_id) == ["run", "delete"]


async def test_a_delete_kafka_did_not_confirm_happens_though_redis_missed_the_abandon(
        api_via_both: Client, redis: Redis, proxy: KafkaProxy, redis_proxy: ReplyLossProxy,
        topics: Settings) -> None:
    posted = await api_via_both.post("/api/v1/batches/p", headers=AUTH)
    assert posted.status == 200
    batch_id = (await posted.json())["item"]
    # Both links fail as the delete is sent: Kafka writes it, its answer is lost, and Redis
    # is away as the batch is hidden and its delete recorded in the outbox.
    proxy.mute()
    redis_proxy.arm(keys.ABANDONED.encode(), outage=True)
    deleted = await api_via_both.delete(f"/api/v1/batches/p/{batch_id}", headers=AUTH)
    assert redis_proxy.fired == 1
    redis_proxy.restore()
    proxy.restore()
    # The delete is on the topic: the batch goes, abandoned by this process once Redis is
    # back. Answered 503 all the same (diff review): only the process's memory held that,
    # and a process restarted meanwhile would have left it undone after a 200.
    assert _of(await read_topic(topics, topics.topic_commands,
                                lambda rs: "delete" in _of(rs, batch_id)), batch_id) == [
        "run", "delete"]
    assert deleted.status == 503, await deleted.text()

    async def hidden() -> bool:
        return await redis.hget(keys.batch("p", batch_id), "deleted") is not None
    await eventually(hidden, timeout=15)


async def test_a_stop_kafka_did_not_confirm_happens_though_redis_missed_its_outbox(
        api_via_both: Client, redis: Redis, proxy: KafkaProxy, redis_proxy: ReplyLossProxy,
        topics: Settings) -> None:
    posted = await api_via_both.post("/api/v1/batches/p", headers=AUTH)
    assert posted.status == 200
    batch_id = (await posted.json())["item"]
    proxy.mute()
    redis_proxy.arm(STOPS.encode(), outage=True)
    stopped = await api_via_both.put(f"/api/v1/batches/p/{batch_id}/stop", headers=AUTH)
    assert redis_proxy.fired == 1
    redis_proxy.restore()
    proxy.restore()
    # The stop is on the topic and is sent again by this process once Redis is back. Answered
    # 503 all the same (diff review): only the process's memory held that.
    await read_topic(topics, topics.topic_commands, lambda rs: "stop" in _of(rs, batch_id))
    assert stopped.status == 503, await stopped.text()
    await read_topic(topics, topics.topic_commands,
                     lambda rs: _of(rs, batch_id).count("stop") >= 2, timeout=30)


async def test_transitions_redis_did_not_take_are_stopped_and_named_at_shutdown(
        caplog: pytest.LogCaptureFixture) -> None:
    """An Idempotency-Key's commit Redis did not take is tried again in the background; at
    shutdown those tries went on against a closed client until aiohttp cancelled whatever was
    left, and nothing said which keys stayed pending (diff review)."""
    unreachable = Redis(port=free_port(), socket_connect_timeout=0.2)
    keys_ = IdempotencyKeys(unreachable, ApiScripts(unreachable), ttl_s=60)
    try:
        await keys_.commit("dhub:idem:x", "committed", "batch-x")  # not taken: tried again
        assert len(keys_._again) == 1
        task = next(iter(keys_._again))
        with caplog.at_level(logging.ERROR, logger="service.idempotency"):
            await keys_.close()
        assert task.cancelled() and not keys_._again
        assert "1 Idempotency-Key transitions" in caplog.text
    finally:
        await keys_.close()
        await unreachable.aclose()


async def test_what_only_the_process_held_is_named_at_shutdown(
        caplog: pytest.LogCaptureFixture) -> None:
    """A DELETE's abandon and a stop's outbox entry that met Redis away are held in the API
    process's memory (answered 503); a shutdown dropped them without a word (diff review)."""
    unreachable = Redis(port=free_port(), socket_connect_timeout=0.2)
    abandoner = Abandoner(unreachable, ApiScripts(unreachable), cast(CommandSender, None))
    try:
        with pytest.raises(RedisConnectionError):
            await abandoner.abandon("p", "batch-a", "1", "deleted", released=False)
        with pytest.raises(RedisConnectionError):
            await abandoner.resend_stop("p", "batch-s", "1")
        with caplog.at_level(logging.ERROR, logger="service.abandon"):
            abandoner.left_at_shutdown()
        assert "p/batch-a was never abandoned" in caplog.text
        assert "batch-s" in caplog.text and "never recorded" in caplog.text
    finally:
        await unreachable.aclose()


async def test_an_entry_failing_for_good_does_not_hold_up_the_others(
        redis: Redis, caplog: pytest.LogCaptureFixture) -> None:
    """Of the abandons left for Redis to come back, one failing for good (its key of another
    type) raised at every round, and the entries after it were never done: their batches
    stayed visible and pending (diff review)."""
    store = BatchStore.from_settings(redis, Settings())
    ok = new_batch_id()
    await store.create("p-undo", ok, spec())
    broken = new_batch_id()
    await redis.set(keys.batch("p-undo", broken), "not a hash")
    abandoner = Abandoner(redis, ApiScripts(redis), cast(CommandSender, None))
    abandoner._unhidden = {("p-undo", broken): ("1", "test", False, None),
                           ("p-undo", ok): ("1", "test", False, None)}
    with caplog.at_level(logging.ERROR, logger="service.abandon"):
        await abandoner._undo_pending()
    assert await redis.hget(keys.batch("p-undo", ok), "deleted") is not None
    assert not abandoner._unhidden and "given up" in caplog.text
