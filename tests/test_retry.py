"""The one error policy (core/retry.py): the verdicts on real errors, and the retry primitive's
bounds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError, NotLeaderForPartitionError
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from core.retry import Backoff, GaveUp, Permanent, RetryPolicy, Stopping, Verdict, classify
from tests.conftest import PrivateRedis, free_port

FAST = RetryPolicy(initial_s=0.001, cap_s=0.002, max_attempts=3, max_elapsed_s=60)


@pytest.fixture
async def redis_alone(private_redis: PrivateRedis) -> AsyncIterator[Redis]:
    """A client of a Redis this test may make read-only and full (the shared one must not be)."""
    client = Redis(port=private_redis.port, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


WRITE_SCRIPT = "redis.call('SET', KEYS[1], ARGV[1]) return 1"


async def test_a_read_only_replica_is_unavailable_not_bad_data(redis_alone: Redis) -> None:
    await redis_alone.replicaof("127.0.0.1", str(free_port()))
    for call in (redis_alone.set("k", "v"), redis_alone.eval(WRITE_SCRIPT, 1, "k", "v")):
        with pytest.raises(ResponseError) as caught:
            await call
        assert classify(caught.value) is Verdict.UNAVAILABLE, caught.value


async def test_a_full_redis_is_unavailable(redis_alone: Redis) -> None:
    await redis_alone.config_set("maxmemory-policy", "noeviction")
    await redis_alone.config_set("maxmemory", 1)
    for call in (redis_alone.set("k", "v"), redis_alone.eval(WRITE_SCRIPT, 1, "k", "v")):
        with pytest.raises(ResponseError) as caught:
            await call
        assert classify(caught.value) is Verdict.UNAVAILABLE, caught.value


async def test_a_script_error_about_the_data_is_permanent(redis_alone: Redis) -> None:
    await redis_alone.set("k", "not a number")
    with pytest.raises(ResponseError) as caught:
        await redis_alone.eval("return redis.call('INCR', KEYS[1])", 1, "k")
    assert classify(caught.value) is Verdict.PERMANENT


async def test_a_refused_connection_is_unavailable() -> None:
    client = Redis(port=free_port(), socket_connect_timeout=1)
    try:
        with pytest.raises(Exception) as caught:
            await client.ping()
    finally:
        await client.aclose()
    assert classify(caught.value) is Verdict.UNAVAILABLE


def _status(code: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://prefect/api/flow_runs/")
    return httpx.HTTPStatusError("x", request=request, response=httpx.Response(code, request=request))


@pytest.mark.parametrize(("error", "verdict"), [
    (KafkaConnectionError("down"), Verdict.UNAVAILABLE),
    (NotLeaderForPartitionError(), Verdict.UNAVAILABLE),
    (MessageSizeTooLargeError(), Verdict.PERMANENT),
    (_status(503), Verdict.BOUNDED),
    (_status(429), Verdict.BOUNDED),
    (_status(422), Verdict.PERMANENT),
    (OSError("disk trouble"), Verdict.BOUNDED),
    (ConnectionRefusedError(), Verdict.UNAVAILABLE),
    (ValueError("bad data"), Verdict.PERMANENT),
    # Redis 6 wraps a refused write inside a script; Redis 7 leads with the code.
    (ResponseError("ERR Error running script (call to f_1): @user_script:1: -READONLY You can't "
                   "write against a read only replica."), Verdict.UNAVAILABLE),
    (ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
     Verdict.PERMANENT),
    (Permanent("unknown version"), Verdict.PERMANENT),
])
def test_verdicts(error: BaseException, verdict: Verdict) -> None:
    assert classify(error) is verdict


def test_the_chain_is_followed() -> None:
    try:
        try:
            raise httpx.ConnectError("refused")
        except httpx.ConnectError as inner:
            raise RuntimeError("prefect client failed") from inner
    except RuntimeError as outer:
        assert classify(outer) is Verdict.UNAVAILABLE


async def test_bounded_errors_give_up_after_the_policy() -> None:
    calls = 0

    async def always_503() -> None:
        nonlocal calls
        calls += 1
        raise _status(503)

    with pytest.raises(GaveUp) as caught:
        await Backoff(asyncio.Event(), FAST).call("create run", always_503)
    assert calls == FAST.max_attempts
    assert classify(caught.value) is Verdict.PERMANENT  # a dead-letter reason now


async def test_unavailable_is_waited_out_beyond_the_bound() -> None:
    calls = 0

    async def down_for_a_while() -> str:
        nonlocal calls
        calls += 1
        if calls <= FAST.max_attempts * 3:
            raise KafkaConnectionError("down")
        return "done"

    assert await Backoff(asyncio.Event(), FAST).call("send", down_for_a_while) == "done"


async def test_permanent_errors_are_not_retried() -> None:
    calls = 0

    async def bad() -> None:
        nonlocal calls
        calls += 1
        raise Permanent("unknown pipeline")

    with pytest.raises(Permanent):
        await Backoff(asyncio.Event(), FAST).call("run", bad)
    assert calls == 1


async def test_shutdown_interrupts_the_wait() -> None:
    stopping = asyncio.Event()
    backoff = Backoff(stopping, RetryPolicy(initial_s=30, cap_s=30))

    async def down() -> None:
        raise KafkaConnectionError("down")

    task = asyncio.create_task(backoff.call("send", down))
    await asyncio.sleep(0)
    stopping.set()
    with pytest.raises(Stopping):
        await asyncio.wait_for(task, 5)
