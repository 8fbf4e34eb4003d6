"""The life cycle every consumer part shares: start, run until asked to stop, close.

`run()` returns once `request_stop()` was called and the in-flight work is finished (or
abandoned uncommitted, when a dependency is down); `stop()` does both and then closes the
part's clients. Tests drive parts the same way the runner does.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from typing import ClassVar

log = logging.getLogger(__name__)


class Part(abc.ABC):
    name: ClassVar[str]

    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self._running = False
        self._finished = asyncio.Event()

    @abc.abstractmethod
    async def start(self) -> None:
        """Opens the part's clients; raises when a dependency stays unavailable."""

    @abc.abstractmethod
    async def _loop(self) -> None:
        """The work, until `self.stopping` is set."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Releases the clients; safe to call after a failed or partial start."""

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
                await asyncio.wait_for(asyncio.shield(self._finished.wait()), grace)
            except TimeoutError:
                log.warning("%s did not finish within %.0fs", self.name, grace)
        await self.close()

    async def sleep(self, seconds: float) -> bool:
        """Sleeps unless stopping; True when the part should stop."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True


async def close_all(*clients: object) -> None:
    """Closes a part's clients in order (None: never opened) by their own verb — `aclose`
    (redis), `stop` (aiokafka) or `close`; one that fails does not keep the others open."""
    for client in clients:
        if client is None:
            continue
        close = (getattr(client, "aclose", None) or getattr(client, "stop", None)
                 or getattr(client, "close", None))
        if close is None:
            raise TypeError(f"{type(client).__name__} has no aclose, stop or close")
        try:
            await close()
        except Exception:
            log.warning("closing %s failed", type(client).__name__, exc_info=True)
