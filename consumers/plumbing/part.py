"""The life cycle every consumer part shares: start on the clients, run until asked to stop,
close.

A process's parts share one Redis client and one Kafka producer (`consumers.plumbing.scope`, which
opens them and closes them after the parts). A part started without them (`start()`, as
tests do) opens its own, on its own scope. Either way a part registers what it opens
itself — its Kafka consumer, its Prefect client — on its scope, and `close()` releases them
in reverse.

`run()` returns once `request_stop()` was called and the in-flight work is finished (or
abandoned uncommitted, when a dependency is down); `stop()` does both and then closes the
part.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import ClassVar

from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from consumers.plumbing.options import ConsumerOptions
from core.connections import open_producer, open_redis
from core.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Clients:
    """What the parts of one process share: one Redis client (with its pool) and one
    producer (its batching serves every part's sends)."""

    redis: Redis
    producer: AIOKafkaProducer


async def open_clients(scope: contextlib.AsyncExitStack, settings: Settings) -> Clients:
    """Opens the shared clients, each closed by `scope` in reverse of opening."""
    redis = await open_redis(settings)
    scope.push_async_callback(redis.aclose)
    producer = await open_producer(settings)
    scope.push_async_callback(producer.stop)
    return Clients(redis, producer)


class Part(abc.ABC):
    name: ClassVar[str]
    settings: Settings
    options: ConsumerOptions

    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self._running = False
        self._finished = asyncio.Event()
        self._scope = contextlib.AsyncExitStack()

    async def start(self, clients: Clients | None = None) -> None:
        """Opens the part on the process's shared clients, or on its own (closed with the
        part) without them; raises when a dependency stays unavailable, leaving nothing
        open."""
        try:
            if clients is None:
                clients = await open_clients(self._scope, self.settings)
            await self._open(clients, self._scope)
        except BaseException:
            await self.close()
            raise

    @abc.abstractmethod
    async def _open(self, clients: Clients, scope: contextlib.AsyncExitStack) -> None:
        """Builds the part on `clients` and opens its own clients, each registered on
        `scope` (closed in reverse by `close()`)."""

    @abc.abstractmethod
    async def _loop(self) -> None:
        """The work, until `self.stopping` is set."""

    async def close(self) -> None:
        """Releases what the part opened, in reverse; safe after a failed or partial start,
        and twice. A client that fails to close does not keep the others open."""
        try:
            await asyncio.shield(self._scope.aclose())
        except Exception:
            log.warning("closing %s failed", self.name, exc_info=True)

    async def run(self) -> None:
        self._running = True
        try:
            await self._loop()
        finally:
            self._finished.set()

    def request_stop(self) -> None:
        self.stopping.set()

    async def stop(self, grace: float = 30.0) -> None:
        self.request_stop()
        if self._running:
            try:
                async with asyncio.timeout(grace):
                    await self._finished.wait()
            except TimeoutError:
                log.warning("%s did not finish within %.0fs", self.name, grace)
        await self.close()

    async def sleep(self, seconds: float) -> bool:
        """Sleeps unless stopping; True when the part should stop."""
        try:
            async with asyncio.timeout(seconds):
                await self.stopping.wait()
        except TimeoutError:
            return False
        return True
