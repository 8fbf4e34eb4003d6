"""Redis connections that give back the cancels redis-py's `asyncio.wait_for` drops.

redis-py runs two steps through `asyncio.wait_for`: a command's write, when the connection
has a `socket_timeout` (its default is 5 s), and the drain of push notifications buffered on an
idle connection (RESP3, which it speaks by default). On Python 3.11, wait_for returns the
step's result, or raises its error, when a cancel lands as the step completes, and the cancel is
lost: the task goes on talking to Redis (45% of random cancels during writes,
`tests/test_redis_cancellation.py`), and a shutdown or a test's cleanup waits on it for ever.
(Python 3.12 rebuilt wait_for on `asyncio.timeout`, which keeps it.)

A cancel counts on its task whether delivered or not, and wait_for's own deadline cancels only
the step it wraps: a task whose count rose during a step that ended without a CancelledError
was cancelled, and the cancel is raised here. Bounding the write with `asyncio.timeout`
instead would also do, at 4 µs of CPU a command (measured); this costs a tenth of that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from urllib.parse import urlsplit

from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)


class _CancelKeeping(AbstractConnection):
    async def send_packed_command(self, command: bytes | str | Iterable[bytes],
                                  check_health: bool = True) -> None:
        await self._keeping_cancels(super().send_packed_command(command, check_health))

    async def handle_pending_push_notifications(self) -> None:
        await self._keeping_cancels(super().handle_pending_push_notifications())

    async def _keeping_cancels(self, step: Awaitable[None]) -> None:
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            await step
        except Exception as error:
            # A failed step the cancel landed on: redis-py would retry it on a new connection.
            if task is not None and task.cancelling() > cancels:
                raise asyncio.CancelledError from error
            raise
        if task is not None and task.cancelling() > cancels:
            # What was sent has its reply unread: the connection cannot be reused, as redis-py
            # drops it when a cancel reaches its write.
            try:
                await self.disconnect(nowait=True)
            finally:
                raise asyncio.CancelledError


class TcpConnection(_CancelKeeping, Connection):
    pass


class TlsConnection(_CancelKeeping, SSLConnection):
    pass


class UnixConnection(_CancelKeeping, UnixDomainSocketConnection):
    pass


_BY_SCHEME: dict[str, type[AbstractConnection]] = {
    "redis": TcpConnection, "rediss": TlsConnection, "unix": UnixConnection}


def connection_class(url: str) -> type[AbstractConnection]:
    """The class for a `redis://`, `rediss://` or `unix://` URL (`core.settings` checks the
    scheme), to pass as a pool's `connection_class`."""
    return _BY_SCHEME[urlsplit(url).scheme]
