"""A TCP proxy to Redis that loses one reply: the command carrying a chosen needle reaches
Redis, which runs it, and the connection is then reset instead of relaying the answer. What a
Redis restart, a failover or a network cut right after a write looks like to the client,
which reconnects and sends the command again.

    async with ReplyLossProxy("127.0.0.1", 6379) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/4"
        proxy.arm(sha_of_the_script.encode())      # its next call runs, its reply is lost
        proxy.arm(needle, outage=True)             # or: Redis unreachable from that call on
        proxy.restore()

With `cut_open`, an outage (`arm(..., outage=True)` or `cut()`) also resets the connections
already open, as a host's link going down does: nothing of that client reaches Redis until
`restore()`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable


class ReplyLossProxy:
    def __init__(self, host: str, port: int, *, cut_open: bool = False) -> None:
        self.target = (host, port)
        self.cut_open = cut_open
        self._resets: set[Callable[[], None]] = set()
        self.port = 0
        self.fired = 0  # commands whose reply was lost
        self._needle: bytes | None = None
        self._outage = False
        self.down = False  # every connection refused (reset) until `restore()`
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def arm(self, needle: bytes, *, outage: bool = False) -> None:
        """The next command sent containing `needle` runs in Redis and its reply is lost;
        with `outage`, it does not reach Redis and Redis is unreachable from then on."""
        self._needle = needle
        self._outage = outage

    def restore(self) -> None:
        self.down = False

    def cut(self) -> None:
        """Redis unreachable from now on: new connections refused, and with `cut_open` the
        open ones reset."""
        self.down = True
        if self.cut_open:
            for reset in list(self._resets):
                reset()

    async def __aenter__(self) -> ReplyLossProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        lose = asyncio.Event()

        def reset() -> None:
            writer.transport.abort()
            up_writer.transport.abort()
            self._resets.discard(reset)

        self._resets.add(reset)

        def cut_off() -> bool:
            return self.cut_open and self.down

        async def upstream() -> None:
            with contextlib.suppress(Exception):
                while data := await reader.read(65536):
                    if cut_off():
                        break
                    if self._needle is not None and self._needle in data:
                        self._needle = None
                        self.fired += 1
                        lose.set()
                        if self._outage:
                            self.cut()
                            break
                    up_writer.write(data)
                    await up_writer.drain()
            reset()

        async def downstream() -> None:
            with contextlib.suppress(Exception):
                while data := await up_reader.read(65536):
                    if lose.is_set() or cut_off():  # Redis ran it; the client never hears
                        break
                    writer.write(data)
                    await writer.drain()
            reset()

        for coro in (upstream(), downstream()):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
