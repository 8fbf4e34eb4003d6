"""Redis commands of one event-loop turn sent together, in one pipelined round trip.

A lone command through redis-py costs far more CPU than Redis spends on it (a pool checkout,
a send, a wake-up, a parse): ~240 µs per LINDEX and ~330 µs per script call on the loaded
2-core machine, against a few tens of µs per command when they share a pipeline. Concurrent
POSTs queue their commands ("which version is latest", then the batch's create script); the
queue is sent once the turn's ready callbacks have run, and each request awaits its own reply.

- `read`: a read-only command. The same read twice in a turn is sent once: both asked before
  it was sent, so the answer is as fresh for both as a read of their own would be.
- `script`: one call of a registered script (EVALSHA), atomic on its own as ever; never
  shared. A script Redis does not know (after a restart or SCRIPT FLUSH) is called again on
  its own, which loads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import DataError, NoScriptError, ResponseError

from service.request_log import detached

MAX_PIPELINE = 256


class TurnReads:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        # command -> (the script for a script call, else None; the reply's future)
        self._queued: dict[Any, tuple[AsyncScript | None, asyncio.Future[Any]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: Any = None  # a pooled connection kept between exchanges

    async def read(self, *command: str) -> Any:
        """The reply of a read-only command, e.g. `read("LINDEX", key, "-1")`."""
        queued = self._queued.get(command)
        future = queued[1] if queued is not None else self._queue(command, None)
        # Shielded: a request that goes away must not cancel the others' read.
        return await asyncio.shield(future)

    async def script(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """The reply of one call of `script` (the same arguments as calling it)."""
        command = ("EVALSHA", _Call(), len(keys), *keys, *args)
        future = self._queue(command, script)
        try:
            # Not shielded: the future is this call's alone (a cancelled one is skipped).
            return await future
        except NoScriptError:
            return await script(keys=keys, args=args)

    def _queue(self, command: Any, script: AsyncScript | None) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        if not self._queued:
            loop.call_soon(self._flush)
        future: asyncio.Future[Any] = loop.create_future()
        self._queued[command] = (script, future)
        if len(self._queued) >= MAX_PIPELINE:
            self._flush()
        return future

    def _flush(self) -> None:
        if not self._queued:
            return
        reads, self._queued = self._queued, {}
        task = detached(self._send(reads))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, reads: dict[Any, tuple[AsyncScript | None, asyncio.Future[Any]]]
                    ) -> None:
        # EVALSHA straight away (no SCRIPT EXISTS first, as a pipeline would), and the turn
        # written as one packet on a pooled connection, the replies read back in order: a
        # redis-py pipeline costs ~10 µs of Python per command (packing each argument,
        # per-command bookkeeping), several times what this does.
        packed = b"".join(
            _pack(command) if script is None else _pack(("EVALSHA", script.sha, *command[2:]))
            for command, (script, _) in reads.items())
        try:
            replies = await self._exchange(packed, len(reads))
        except BaseException as exc:
            for _, future in reads.values():
                if future.done():
                    continue
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                    future.exception()  # every waiter may have gone away
                else:
                    future.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), reply in zip(reads.values(), replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
                future.exception()
            else:
                future.set_result(reply)

    async def _exchange(self, packed: bytes, count: int) -> list[Any]:
        """The `count` replies (an error reply as its exception) to the packed commands, with
        the client's retry policy on a broken connection, as a pipeline has."""
        pool = self._redis.connection_pool
        # The connection of the last exchange is kept for the next: a checkout from the
        # blocking pool (a lock, a timeout, a readiness probe of the socket) costs about as
        # much as the exchange's own Python. An exchange while it is in use takes another.
        conn, self._idle = self._idle, None
        if conn is None:
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]

        async def exchange() -> list[Any]:
            await conn.send_packed_command(packed)
            replies: list[Any] = []
            for _ in range(count):
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:  # read whole: the stream stays in step
                    replies.append(exc)
            return replies

        async def broken(error: Exception) -> None:
            await conn.disconnect()

        try:
            replies: list[Any] = await conn.retry.call_with_retry(exchange, broken)
        except BaseException:
            # Replies may be left unread: the connection must not be used again as it is.
            with contextlib.suppress(Exception):
                await conn.disconnect()
            await pool.release(conn)
            raise
        if self._idle is None:
            self._idle = conn
        else:
            await pool.release(conn)
        return replies


def _pack(command: tuple[Any, ...]) -> bytes:
    """One command in RESP, arguments encoded as redis-py does (str as UTF-8, int and float
    as their decimal text, bytes as they are)."""
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        if isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, int) and not isinstance(arg, bool):
            data = b"%d" % arg
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            raise DataError(f"invalid argument {arg!r} of type {type(arg).__name__}")
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


class _Call:
    """Makes each script call its own entry of the queue (a write is never shared)."""

    __slots__ = ()


_READS: weakref.WeakKeyDictionary[Redis, TurnReads] = weakref.WeakKeyDictionary()


def turn_reads(redis: Redis) -> TurnReads:
    """The batched reader of a Redis client (one per client: one per application)."""
    reads = _READS.get(redis)
    if reads is None:
        reads = _READS[redis] = TurnReads(redis)
    return reads
