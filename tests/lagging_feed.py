"""A TCP proxy to Redis that delays what Redis sends on subscribed connections: the GET
cache's change feed lags behind reads made on other connections, as it does behind a busy
API process or a slow link (nothing orders a message's arrival with another connection's
reply)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from core.settings import Settings


class LaggingFeedProxy:
    def __init__(self, host: str, port: int, lag_s: float) -> None:
        self.target = (host, port)
        self.lag_s = lag_s
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> LaggingFeedProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers += [writer, up_writer]
        subscribed = [False]
        self._spawn(self._up(reader, up_writer, subscribed))
        self._spawn(self._down(up_reader, writer, subscribed))

    @staticmethod
    async def _up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  subscribed: list[bool]) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if b"SUBSCRIBE" in data.upper():
                    subscribed[0] = True
                writer.write(data)
                await writer.drain()
        writer.transport.abort()

    async def _down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    subscribed: list[bool]) -> None:
        """Redis's bytes, in order; those of a subscribed connection `lag_s` late."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def send() -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while (item := await queue.get()) is not None:
                    due, data = item
                    if (wait := due - loop.time()) > 0:
                        await asyncio.sleep(wait)
                    writer.write(data)
                    await writer.drain()
            writer.transport.abort()

        self._spawn(send())
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                queue.put_nowait((loop.time() + (self.lag_s if subscribed[0] else 0.0), data))
        queue.put_nowait(None)


@contextlib.asynccontextmanager
async def lagging_feed(settings: Settings, lag_s: float) -> AsyncIterator[Settings]:
    """Settings whose Redis goes through a LaggingFeedProxy."""
    url = urlsplit(settings.redis_url)
    async with LaggingFeedProxy(url.hostname or "127.0.0.1", url.port or 6379, lag_s) as proxy:
        yield settings.model_copy(
            update={"redis_url": f"redis://127.0.0.1:{proxy.port}{url.path}"})
