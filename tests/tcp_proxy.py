"""A small asyncio TCP proxy for fault tests: forward, add latency, cut, or blackhole.

A blackholed connection keeps both sockets open and silently drops every byte in both
directions (and swallows the end-of-stream too): what a NAT or a load balancer that forgot an
idle flow looks like to both ends. Connections are chosen with a predicate, typically on what
the client sent so far, e.g. `sent(b"SUBSCRIBE")` for a Redis pub/sub connection.

    async with TcpProxy("127.0.0.1", 6379) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/4"
        ...
        proxy.blackhole(sent(b"SUBSCRIBE"))               # the current subscriptions only
        proxy.blackhole(sent(b"SUBSCRIBE"), sticky=True)  # and every later one
        proxy.forward()                                   # back to normal (dropped bytes are lost)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

Where = Callable[["Link"], bool]
HEAD_BYTES = 64 * 1024  # how much of what a client sent is kept for predicates


def sent(needle: bytes) -> Where:
    """Connections whose client has sent `needle` (within its first HEAD_BYTES)."""
    return lambda link: needle in link.head


def every(_link: Link) -> bool:
    return True


@dataclass(eq=False)
class Link:
    """One proxied client connection and its upstream connection."""

    id: int
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    head: bytearray = field(default_factory=bytearray)
    blackholed: bool = False
    dropped: int = 0  # bytes swallowed while blackholed
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for writer in (self.client, self.server):
            writer.transport.abort()


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self.latency_s = 0.0  # added to every chunk, each direction, order kept
        self.links: list[Link] = []
        self._sticky: Where | None = None
        self._server: asyncio.Server | None = None
        self._ids = itertools.count(1)

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self.links):
            link.abort()
            for task in link.tasks:
                task.cancel()
            await asyncio.gather(*link.tasks, return_exceptions=True)
        self.links.clear()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def url(self, scheme: str, path: str = "") -> str:
        return f"{scheme}://{self.host}:{self.port}{path}"

    # -- faults ----------------------------------------------------------------------------

    def blackhole(self, where: Where = every, *, sticky: bool = False) -> int:
        """Silently drops the bytes of matching connections; with `sticky`, also of every
        connection that matches later (checked as its client sends). Returns how many now."""
        if sticky:
            self._sticky = where
        chosen = [link for link in self.links if where(link)]
        for link in chosen:
            link.blackholed = True
        return len(chosen)

    def cut(self, where: Where = every) -> int:
        """Resets matching connections (both sides see the connection drop)."""
        chosen = [link for link in self.links if where(link)]
        for link in chosen:
            link.abort()
        return len(chosen)

    def forward(self) -> None:
        """Normal forwarding again, for current and new connections."""
        self._sticky = None
        for link in self.links:
            link.blackholed = False

    # -- plumbing --------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        link = Link(next(self._ids), writer, up_writer)
        self.links.append(link)
        link.tasks += [
            asyncio.create_task(self._pump(link, reader, up_writer, from_client=True)),
            asyncio.create_task(self._pump(link, up_reader, writer, from_client=False)),
        ]

    async def _pump(self, link: Link, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, *, from_client: bool) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        sender = asyncio.create_task(self._send(link, queue, writer))
        link.tasks.append(sender)
        try:
            while data := await reader.read(65536):
                if from_client:
                    if len(link.head) < HEAD_BYTES:
                        link.head += data[:HEAD_BYTES - len(link.head)]
                    if self._sticky is not None and self._sticky(link):
                        link.blackholed = True
                if link.blackholed:
                    link.dropped += len(data)
                    continue
                queue.put_nowait((loop.time() + self.latency_s, data))
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait(None)
            with contextlib.suppress(Exception):
                await sender
            # A blackhole swallows the end of stream as well: the other side hears nothing.
            if not link.blackholed:
                link.abort()
                if link in self.links:
                    self.links.remove(link)

    @staticmethod
    async def _send(link: Link, queue: asyncio.Queue[tuple[float, bytes] | None],
                    writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (item := await queue.get()) is not None:
                due, data = item
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if link.blackholed:
                    link.dropped += len(data)
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            link.abort()
