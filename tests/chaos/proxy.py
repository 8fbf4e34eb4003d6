"""A TCP proxy that can silently blackhole connections, like a NAT or load balancer that
dropped an idle flow: the sockets stay open, bytes in either direction vanish."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass(eq=False)
class Link:
    subscriber: bool = False  # the client sent (P)SUBSCRIBE on it: a pub/sub connection
    dark: bool = False
    writers: list[asyncio.StreamWriter] = field(default_factory=list)


class BlackholeProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.links: list[Link] = []
        self.dropped_bytes = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for link in self.links:
            for writer in link.writers:
                writer.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def blackhole_subscribers(self) -> int:
        """Darkens every pub/sub connection open now (new ones pass); how many it darkened."""
        found = [link for link in self.links if link.subscriber and not link.dark]
        for link in found:
            link.dark = True
        return len(found)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        link = Link(writers=[writer, up_writer])
        self.links.append(link)
        for task in (self._pump(reader, up_writer, link, True),
                     self._pump(up_reader, writer, link, False)):
            t = asyncio.create_task(task)
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link,
                    from_client: bool) -> None:
        try:
            while data := await reader.read(65536):
                if from_client and b"SUBSCRIBE" in data.upper():
                    link.subscriber = True
                if link.dark:
                    self.dropped_bytes += len(data)
                    continue
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if not link.dark:  # a dark link stays open: that is the point
                writer.close()
