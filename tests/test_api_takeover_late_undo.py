"""Two API processes on one Redis and Kafka, and a POST's late undo or abandon (review).

Process 1 loses its Redis link during a POST with an Idempotency-Key: its create never
reaches Redis (or Kafka's ack of its run command is lost and the abandon cannot reach Redis).
It answers 503, and the undo (or abandon) of its batch and the key's release wait in its
memory. The link stays down past the key's lease; the client's retry reaches process 2,
which takes the key over (`TAKE_KEY`), creates the batch or sends its run again, commits and
answers 200 with it. Then process 1's link comes back.

What was wrong: the late undo purged that batch (404), or abandoned it once a consumer had
taken its run (hidden `stop`/`failed`, its delete queued), and a late abandon hid it: the key
answered 200 with a batch that was gone or cancelled. Only the key's release checked whose
the record was.
What is true now: before a POST's undo or abandon touches its batch, `HOLD_FOR_UNDO` decides,
on the key's record, whether the batch is still the failed attempt's: a record that holds
the batch for another attempt (a take-over) or committed with it leaves the batch alone, and
one still the attempt's own gets a new lease in the same call, so no retry takes the batch
over before the undo is done and the key released."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core import keys
from core.api_scripts import CREATE_LATEST_BATCH, HOLD_FOR_UNDO
from core.codec import decode_command
from core.settings import Settings
from service.appkeys import ABANDONER, IDEMPOTENCY
from tests.conftest import eventually
from tests.helpers import AUTH, api_client, api_settings, read_topic, spec_body
from tests.reply_loss_proxy import ReplyLossProxy
from tests.test_post_killed import retried
from tests.write_faults_proxy import KafkaProxy

Client = TestClient[Any, Any]
LEASE_MS = 300
HEADERS = {**AUTH, "Idempotency-Key": "two-procs-1"}


def _sha(script: str) -> bytes:
    return hashlib.sha1(script.encode()).hexdigest().encode()


@pytest.fixture
async def redis_proxy(test_settings: Settings) -> AsyncIterator[ReplyLossProxy]:
    url = urlsplit(test_settings.redis_url)
    p = ReplyLossProxy(url.hostname or "127.0.0.1", url.port or 6379, cut_open=True)
    async with p:
        yield p


def _tuned(*clients: Client) -> None:
    for client in clients:
        client.app[IDEMPOTENCY]._pending_ttl_ms = LEASE_MS  # stands for the 60 s lease
        client.app[ABANDONER]._idle_s = 0.1


@pytest.fixture
async def two(topics: Settings, redis: Redis, redis_proxy: ReplyLossProxy
              ) -> AsyncIterator[tuple[Client, Client]]:
    db = urlsplit(topics.redis_url).path
    one_settings = api_settings(topics, redis_url=f"redis://127.0.0.1:{redis_proxy.port}{db}")
    async with api_client(one_settings) as one, api_client(api_settings(topics)) as other:
        response = await other.put("/api/v1/pipelines/p", json=spec_body(), headers=AUTH)
        assert response.status == 201
        _tuned(one, other)
        try:
            yield one, other
        finally:
            redis_proxy.restore()  # a test failed with the link down: the clients close


@pytest.fixture
async def two_kafka(topics: Settings, redis: Redis, redis_proxy: ReplyLossProxy,
                    proxy: KafkaProxy) -> AsyncIterator[tuple[Client, Client]]:
    db = urlsplit(topics.redis_url).path
    one_settings = api_settings(topics, redis_url=f"redis://127.0.0.1:{redis_proxy.port}{db}",
                                kafka_bootstrap=proxy.address)
    async with api_client(one_settings) as one, api_client(api_settings(topics)) as other:
        response = await other.put("/api/v1/pipelines/p", json=spec_body(), headers=AUTH)
        assert response.status == 201
        _tuned(one, other)
        try:
            yield one, other
        finally:
            # A test failed with the links down: a producer closing on a mute broker waits
            # for its records' timeouts.
            proxy.restore()
            redis_proxy.restore()


async def _left_alone(one: Client, other: Client, redis: Redis, batch_id: str) -> None:
    """Once process 1's late undo or abandon ran: the batch answered stays, no delete queued."""
    await eventually(lambda: one.app[ABANDONER].undoing() == 0, timeout=15)
    response = await other.get(f"/api/v1/batches/p/{batch_id}", headers=AUTH)
    assert response.status == 200, await _shown(redis, batch_id)
    assert await redis.zcard(keys.ABANDONED) == 0  # no delete queued for it


async def _shown(redis: Redis, batch_id: str) -> dict[str, Any]:
    fields = await redis.hgetall(keys.batch("p", batch_id))
    return {**{f: fields.get(f) for f in ("state", "outcome", "deleted", "reason")},
            "purge mark": await redis.exists(keys.batch_purged("p", batch_id))}


def _runs(records: list[Any]) -> list[str]:
    return [c.batch_id for c in map(decode_command, (r.value for r in records))
            if c.type == "run"]


async def test_a_late_undo_leaves_the_batch_a_retry_on_another_process_took_over(
        two: tuple[Client, Client], redis: Redis, redis_proxy: ReplyLossProxy,
        topics: Settings) -> None:
    one, other = two
    await redis.script_load(CREATE_LATEST_BATCH)
    # Process 1's Redis link goes down as its create is sent (after the key's claim).
    redis_proxy.arm(_sha(CREATE_LATEST_BATCH), outage=True)
    first = await one.post("/api/v1/batches/p", headers=HEADERS)
    assert first.status == 503, await first.text()
    assert one.app[ABANDONER].undoing() == 1  # its undo waits for Redis, in its memory
    [(_, undone)] = one.app[ABANDONER]._undone

    batch_id = await retried(other, HEADERS)
    assert batch_id == undone  # the retry took the key over
    assert batch_id in _runs(await read_topic(topics, topics.topic_commands,
                                              lambda rs: batch_id in _runs(rs)))
    assert (await other.get(f"/api/v1/batches/p/{batch_id}", headers=AUTH)).status == 200

    redis_proxy.restore()  # process 1's link comes back: its late undo runs
    # The key answered 200 with this batch, its run command is queued: it is still there.
    await _left_alone(one, other, redis, batch_id)
    again = await other.post("/api/v1/batches/p", headers=HEADERS)
    assert (again.status, await again.json()) == (200, {"item": batch_id})


async def test_a_late_undo_leaves_the_taken_over_batch_once_its_run_was_created(
        two: tuple[Client, Client], redis: Redis, redis_proxy: ReplyLossProxy) -> None:
    """As above, with the commands consumer taking the retry's run command before process
    1's link comes back (recorded here as the consumer records it: `scheduled`, its flow
    run): the late undo, finding it no longer pending, would abandon it."""
    one, other = two
    await redis.script_load(CREATE_LATEST_BATCH)
    redis_proxy.arm(_sha(CREATE_LATEST_BATCH), outage=True)
    first = await one.post("/api/v1/batches/p", headers=HEADERS)
    assert first.status == 503, await first.text()
    [(_, undone)] = one.app[ABANDONER]._undone

    batch_id = await retried(other, HEADERS)
    assert batch_id == undone
    await redis.hset(keys.batch("p", batch_id), mapping={
        "state": "scheduled", "flow_run_id": "8c1bd0b5-1d9e-4a7e-9c55-0d7f3a7f2c11"})

    redis_proxy.restore()
    await _left_alone(one, other, redis, batch_id)


async def test_a_late_abandon_leaves_the_batch_a_retry_on_another_process_took_over(
        two_kafka: tuple[Client, Client], redis: Redis, redis_proxy: ReplyLossProxy,
        proxy: KafkaProxy) -> None:
    """Process 1's host loses both links during a POST with an Idempotency-Key: Kafka writes
    the run command and its answer is lost (Ambiguous), and Redis is away as the batch is
    abandoned. 503; the abandon waits in process 1's memory. The retry on process 2, past
    the lease, takes the key over, finds the batch `pending`, queues its run again, commits
    and answers 200 with it. Process 1's links come back: its late abandon leaves it."""
    one, other = two_kafka
    warm = await one.post("/api/v1/batches/p", headers=AUTH)  # process 1's producer warmed up
    assert warm.status == 200, await warm.text()
    await redis.script_load(HOLD_FOR_UNDO)
    proxy.mute()
    redis_proxy.arm(_sha(HOLD_FOR_UNDO), outage=True)  # the abandon's first call
    first = await one.post("/api/v1/batches/p", headers=HEADERS)
    assert first.status == 503, await first.text()
    assert one.app[ABANDONER].undoing() == 1
    [(_, abandoned)] = one.app[ABANDONER]._unhidden

    batch_id = await retried(other, HEADERS)
    assert batch_id == abandoned  # the retry took the key over
    assert (await other.get(f"/api/v1/batches/p/{batch_id}", headers=AUTH)).status == 200

    proxy.restore()
    redis_proxy.restore()
    await _left_alone(one, other, redis, batch_id)


async def test_an_abandon_cut_short_after_its_check_keeps_the_key_for_its_batch(
        two_kafka: tuple[Client, Client], redis: Redis, redis_proxy: ReplyLossProxy,
        proxy: KafkaProxy) -> None:
    """As above, but Redis went away only after the abandon's check had held the key (its
    outbox entry was lost): the key stays the attempt's, so the retry, past the lease, takes
    it over and finishes the same batch (its run command was on the topic already), and the
    late abandon leaves that batch, committed since. Releasing the key at the check gave the
    retry a second batch beside the first."""
    one, other = two_kafka
    warm = await one.post("/api/v1/batches/p", headers=AUTH)
    assert warm.status == 200, await warm.text()
    proxy.mute()
    needle = f"ZADD\r\n${len(keys.ABANDONED)}\r\n{keys.ABANDONED}\r\n".encode()
    redis_proxy.arm(needle, outage=True)  # the abandon's outbox entry
    first = await one.post("/api/v1/batches/p", headers=HEADERS)
    assert first.status == 503, await first.text()
    assert one.app[ABANDONER].undoing() == 1
    [(_, abandoned)] = one.app[ABANDONER]._unhidden

    batch_id = await retried(other, HEADERS)
    assert batch_id == abandoned  # one batch for the key

    proxy.restore()
    redis_proxy.restore()
    await _left_alone(one, other, redis, batch_id)
    again = await other.post("/api/v1/batches/p", headers=HEADERS)
    assert (again.status, await again.json()) == (200, {"item": batch_id})
