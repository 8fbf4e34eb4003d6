"""Which failures are worth waiting out, and the capped backoff that waits for them.

A command whose effect fails transiently is retried in place and its offset is not
committed, so it is never lost; anything else is permanent and goes to the dead letters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
from aiokafka.errors import KafkaError
from redis import exceptions as redis_errors

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    httpx.TransportError,  # connect/read/write errors and timeouts
    KafkaError,
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    OSError,
    TimeoutError,
)
_TRANSIENT_STATUS = frozenset({408, 425, 429})


class Permanent(Exception):
    """An error that no retry can fix (unknown pipeline version, missing deployment...)."""


class Stopping(Exception):
    """Raised out of a retry loop when the process shuts down before the effect succeeded."""


def is_transient(exc: BaseException) -> bool:
    """True for an unavailable or overloaded dependency, following the exception chain
    (Prefect and ensure-deployment code wrap transport errors in their own)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, Permanent):
            return False
        if isinstance(current, _TRANSIENT_TYPES):
            return True
        if isinstance(current, httpx.HTTPStatusError):
            status = current.response.status_code
            return status >= 500 or status in _TRANSIENT_STATUS
        current = current.__cause__ or current.__context__
    return False


def describe(exc: BaseException) -> str:
    """The error as one line for logs and dead-letter reasons."""
    text = str(exc) or repr(exc)
    return text if isinstance(exc, Permanent) else f"{type(exc).__name__}: {text}"


class Backoff:
    """Capped exponential delays with jitter, cut short when `stopping` is set."""

    def __init__(self, stopping: asyncio.Event, initial: float, cap: float) -> None:
        self._stopping = stopping
        self._initial = initial
        self._cap = cap
        self.retries = 0  # since start, for logs and tests

    async def call(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Runs `attempt` until it succeeds or fails permanently (re-raised as is).

        Raises `Stopping` when shutdown begins while waiting for a dependency."""
        delay = self._initial
        tries = 0
        while True:
            if self._stopping.is_set() and tries:
                raise Stopping(what)
            tries += 1
            try:
                return await attempt()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self.retries += 1
                log.warning("%s: dependency unavailable (%s), retry %d in %.1fs",
                            what, describe(exc), tries, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self._cap)
