"""The fault proxy the cache tests (and others) rely on does what it says: forward, add
latency, blackhole (sockets open, bytes gone, no end of stream), sticky blackhole, cut."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from tests.tcp_proxy import TcpProxy, sent


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with TcpProxy("127.0.0.1", port) as running:
            yield running
    finally:
        server.close()
        await server.wait_closed()


async def _open(proxy: TcpProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(proxy.host, proxy.port)


async def _round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      data: bytes, timeout: float = 2.0) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), timeout)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def test_forwards_and_adds_latency(proxy: TcpProxy) -> None:
    reader, writer = await _open(proxy)
    try:
        assert await _round_trip(reader, writer, b"hello") == b"hello"
        proxy.latency_s = 0.05
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await _round_trip(reader, writer, b"slow") == b"slow"
        assert loop.time() - started >= 0.1  # both directions
    finally:
        await _close(writer)


async def test_blackhole_drops_bytes_but_keeps_the_socket_open(proxy: TcpProxy) -> None:
    reader, writer = await _open(proxy)
    other_reader, other_writer = await _open(proxy)
    try:
        await _round_trip(reader, writer, b"SUBSCRIBE x")
        assert await _round_trip(other_reader, other_writer, b"GET y") == b"GET y"
        assert proxy.blackhole(sent(b"SUBSCRIBE")) == 1
        writer.write(b"ping")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.5)  # neither data nor end of stream
        assert not reader.at_eof()
        # Only the matching connection is affected.
        assert await _round_trip(other_reader, other_writer, b"still") == b"still"
        proxy.forward()
        assert await _round_trip(reader, writer, b"back") == b"back"
    finally:
        await _close(writer)
        await _close(other_writer)


async def test_sticky_blackhole_catches_later_connections(proxy: TcpProxy) -> None:
    proxy.blackhole(sent(b"SUBSCRIBE"), sticky=True)
    reader, writer = await _open(proxy)
    try:
        assert await _round_trip(reader, writer, b"HELLO") == b"HELLO"
        writer.write(b"SUBSCRIBE z")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.5)
        assert proxy.links[0].dropped > 0
    finally:
        await _close(writer)


async def test_cut_resets_the_connection(proxy: TcpProxy) -> None:
    reader, writer = await _open(proxy)
    try:
        await _round_trip(reader, writer, b"x")
        assert proxy.cut() == 1
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await _round_trip(reader, writer, b"y")
    finally:
        await _close(writer)
