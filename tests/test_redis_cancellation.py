"""A task cancelled while it talks to Redis ends, and Redis's deadlines still hold.

On Python 3.11 redis-py bounded each write with asyncio.wait_for, which returns the write's
result when the cancel lands as the write completes: the task then went on as if never
cancelled (measured: 45% of random cancels). A shutdown waited forever on such a task, and so
did a test cleaning up its writer (`test_scale_truth`, a CI run)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.connections import open_redis
from core.redis_connection import TcpConnection, connection_class
from core.settings import Settings

ROUNDS = 150


async def _ended(task: asyncio.Task[None], within_s: float) -> bool:
    done, _ = await asyncio.wait([task], timeout=within_s)
    if not done:  # cancelled again and again until it goes, so nothing outlives the test
        while not task.done():
            task.cancel()
            await asyncio.sleep(0.01)
    return bool(done)


async def test_a_task_cancelled_while_it_sends_commands_always_ends(
        test_settings: Settings) -> None:
    redis = await open_redis(test_settings)
    sha = await redis.script_load("return redis.call('INCR', KEYS[1])")

    async def commands() -> None:
        while True:  # single commands and pipelines, as the store sends them
            await redis.evalsha(sha, 1, "cancel-probe")
            async with redis.pipeline(transaction=False) as pipe:
                for _ in range(3):
                    pipe.evalsha(sha, 1, "cancel-probe")
                await pipe.execute()
            await asyncio.sleep(0)

    rng = random.Random(7)
    ignored = 0
    try:
        for _ in range(ROUNDS):
            if ignored == 3:  # enough to show it; each one costs the wait below
                break
            task = asyncio.create_task(commands())
            await asyncio.sleep(rng.random() * 0.004)
            task.cancel()
            ignored += not await _ended(task, 2.0)
    finally:
        await redis.delete("cancel-probe")
        await redis.aclose()
    assert ignored == 0, f"{ignored} cancelled tasks went on talking to Redis"


# -- the deadlines, against a server that never answers or never reads --------------------
@contextlib.asynccontextmanager
async def _silent_server(reads: bool) -> AsyncIterator[int]:
    """A TCP server that never replies; when `reads` is False it never reads either."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while reads and await reader.read(65536):
            pass

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.transport.abort()
        server.close()


def _client(port: int, deadline_s: float) -> Redis:
    # No retry and no handshake (HELLO, CLIENT SETINFO): the SET is what meets the deadline.
    return Redis.from_pool(ConnectionPool(
        connection_class=connection_class("redis://"), host="127.0.0.1", port=port,
        socket_timeout=deadline_s, socket_connect_timeout=deadline_s,
        retry=Retry(NoBackoff(), 0), protocol=2, driver_info=None))


@pytest.mark.parametrize("reads", [True, False], ids=["no-reply", "no-read"])
async def test_a_server_that_stops_answering_fails_the_command_at_its_deadline(
        reads: bool) -> None:
    deadline_s = 0.3
    # Writing is bounded only once the socket's buffers are full: a value larger than them.
    value = "x" * (1 if reads else 64 * 1024 * 1024)
    async with _silent_server(reads) as port:
        client = _client(port, deadline_s)
        try:
            start = time.monotonic()
            with pytest.raises(RedisTimeoutError,
                               match="reading" if reads else "writing"):
                await client.set("k", value)
            took = time.monotonic() - start
        finally:
            await client.aclose()
    assert deadline_s <= took < deadline_s + 2.0, f"failed after {took:.2f}s"


# -- the drop itself, made certain: the cancel lands as wait_for's step completes ----------
@pytest.mark.parametrize("method", ["send_packed_command", "handle_pending_push_notifications"])
@pytest.mark.parametrize("step_fails", [False, True], ids=["step-returns", "step-fails"])
async def test_a_cancel_wait_for_drops_in_a_step_is_raised(
        monkeypatch: pytest.MonkeyPatch, method: str, step_fails: bool) -> None:
    """redis-py's step replaced by one whose wait_for drops the cancel every time: the cancel
    and the step's end arrive in one turn of the loop. A failed step would be retried by
    redis-py on a new connection, so it must end in the cancel too."""
    loop = asyncio.get_running_loop()

    async def dropping_step(self: AbstractConnection, *args: object) -> None:
        inner: asyncio.Future[None] = loop.create_future()
        task = asyncio.current_task()
        assert task is not None

        def end_and_cancel() -> None:
            if step_fails:
                inner.set_exception(RedisConnectionError("closed by the server"))
            else:
                inner.set_result(None)
            task.cancel()

        loop.call_soon(end_and_cancel)
        await asyncio.wait_for(inner, 5)  # the drop under test

    monkeypatch.setattr(AbstractConnection, method, dropping_step)
    connection = TcpConnection(host="127.0.0.1", port=1)  # never connected: the step is replaced
    step = getattr(connection, method)
    with pytest.raises(asyncio.CancelledError):
        await (step(b"PING\r\n") if method == "send_packed_command" else step())
