"""Redis connections whose write deadline lets a cancellation through.

redis-py bounds a command's write with `asyncio.wait_for` when the connection has a
`socket_timeout`. On Python 3.11, wait_for returns the write's result when a cancel lands as the
write completes, and the cancel is lost: the task goes on talking to Redis (45% of random
cancels, `tests/test_redis_cancellation.py`), and a shutdown or a test's cleanup waits on it
forever. Python 3.12 rebuilt wait_for on `asyncio.timeout`, which tells its own cancel from
anyone else's; these connections use that for the write. Reads keep redis-py's own deadline
(`socket_timeout`, already an `asyncio.timeout`).
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
from redis.exceptions import TimeoutError as RedisTimeoutError


class _CancellableWrites(AbstractConnection):
    async def send_packed_command(self, command: bytes | str | Iterable[bytes],
                                  check_health: bool = True) -> None:
        deadline = self.socket_timeout
        if not deadline:
            await super().send_packed_command(command, check_health)
            return
        # With no socket_timeout redis-py writes without wait_for. The health check the
        # write may start reads with none either: the deadline here covers both.
        self.socket_timeout = None
        scope = asyncio.timeout(deadline)
        try:
            async with scope:
                await super().send_packed_command(command, check_health)
        except TimeoutError as error:
            if not scope.expired():
                raise
            # Part of the command may be on the wire: the connection cannot be reused.
            await self.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from error
        finally:
            self.socket_timeout = deadline


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
