"""Redis connections that give back the cancel redis-py's write deadline drops.

redis-py bounds a command's write with `asyncio.wait_for` when the connection has a
`socket_timeout`. On Python 3.11, wait_for returns the write's result when a cancel lands as the
write completes, and the cancel is lost: the task goes on talking to Redis (45% of random
cancels, `tests/test_redis_cancellation.py`), and a shutdown or a test's cleanup waits on it
forever. (Python 3.12 rebuilt wait_for on `asyncio.timeout`, which keeps it.)

A cancel counts on its task whether delivered or not, and wait_for's own deadline cancels only
the write it wraps: a task whose count rose during a write that returned was cancelled, and the
cancel is raised here. Bounding the write with `asyncio.timeout` instead would also do, at 4 µs
of CPU a command (measured); this costs a tenth of a microsecond.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from urllib.parse import urlsplit

from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)


class _CancellableWrites(AbstractConnection):
    async def send_packed_command(self, command: bytes | str | Iterable[bytes],
                                  check_health: bool = True) -> None:
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        await super().send_packed_command(command, check_health)
        if task is not None and task.cancelling() > cancels:
            # The command is on the wire and its reply unread: the connection cannot be
            # reused, as redis-py drops it when a cancel reaches its write.
            await self.disconnect(nowait=True)
            raise asyncio.CancelledError


class TcpConnection(_CancellableWrites, Connection):
    pass


class TlsConnection(_CancellableWrites, SSLConnection):
    pass


class UnixConnection(_CancellableWrites, UnixDomainSocketConnection):
    pass


_BY_SCHEME: dict[str, type[AbstractConnection]] = {
    "redis": TcpConnection, "rediss": TlsConnection, "unix": UnixConnection}


def connection_class(url: str) -> type[AbstractConnection]:
    """The class for a `redis://`, `rediss://` or `unix://` URL (`core.settings` checks the
    scheme), to pass as a pool's `connection_class`."""
    return _BY_SCHEME[urlsplit(url).scheme]
