"""A small TCP proxy in front of the shared Kafka broker that a test can cut or blackhole.

Kafka clients connect to the address the broker advertises in its metadata, so a plain proxy
would only carry the bootstrap: this one rewrites every Metadata response (API key 3, the
non-flexible versions 0-5 aiokafka uses) to advertise the proxy itself. Everything else is
forwarded byte for byte. Modes:

- `up`: forward;
- `refuse`: close every connection and refuse new ones (a broker that is down);
- `blackhole`: keep the sockets open and silently drop every byte both ways (a dead network
  path);
- `mute`: requests still reach the broker, its answers are dropped (the broker wrote a record
  the client never hears about: the ambiguous send).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from typing import Any

from aiokafka.protocol import metadata

_METADATA_KEY = 3
_RESPONSES: dict[int, Any] = {
    v: getattr(metadata, f"MetadataResponse_v{v}") for v in range(6)
}


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readexactly(4)
    (size,) = struct.unpack(">i", head)
    return head + await reader.readexactly(size)


class KafkaProxy:
    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self.mode = "up"
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # Bytes a blackholed link swallowed, so a test can tell a request was in flight.
        self.swallowed = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def restore(self) -> None:
        self.mode = "up"

    def blackhole(self) -> None:
        self.mode = "blackhole"

    def mute(self) -> None:
        self.mode = "mute"

    def cut(self) -> None:
        """Refuses: every open link is closed, new ones are closed at once."""
        self.mode = "refuse"
        for client, upstream in list(self._links):
            client.close()
            upstream.close()
        self._links.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "refuse":
            writer.close()
            return
        if self.mode in ("blackhole", "mute"):
            await self._swallow(reader, writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.close()
            return
        link = (writer, up_writer)
        self._links.add(link)
        pending: dict[int, tuple[int, int]] = {}
        for coro in (self._requests(reader, up_writer, pending),
                     self._responses(up_reader, writer, pending)):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _swallow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while chunk := await reader.read(65536):
                self.swallowed += len(chunk)
        writer.close()

    async def _requests(self, reader: asyncio.StreamReader, upstream: asyncio.StreamWriter,
                        pending: dict[int, tuple[int, int]]) -> None:
        try:
            while True:
                frame = await _read_frame(reader)
                if self.mode == "blackhole":
                    self.swallowed += len(frame)
                    continue
                if self.mode == "refuse":
                    break
                api_key, version, correlation = struct.unpack(">hhi", frame[4:12])
                pending[correlation] = (api_key, version)
                upstream.write(frame)
                await upstream.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            upstream.close()

    async def _responses(self, reader: asyncio.StreamReader, client: asyncio.StreamWriter,
                         pending: dict[int, tuple[int, int]]) -> None:
        try:
            while True:
                frame = await _read_frame(reader)
                if self.mode != "up":
                    continue
                (correlation,) = struct.unpack(">i", frame[4:8])
                api_key, version = pending.pop(correlation, (-1, -1))
                if api_key == _METADATA_KEY and version in _RESPONSES:
                    frame = self._rewrite(frame, version)
                client.write(frame)
                await client.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            client.close()

    def _rewrite(self, frame: bytes, version: int) -> bytes:
        cls = _RESPONSES[version]
        response = cls.decode(frame[8:])
        response.brokers = [(b[0], "127.0.0.1", self.port, *b[3:]) for b in response.brokers]
        encoded: bytes = response.encode()  # aiokafka is untyped
        body = frame[4:8] + encoded
        return struct.pack(">i", len(body)) + body
