"""The one error policy: which failures are waited out, which are bounded, which are final;
and the one retry primitive (capped exponential backoff with jitter) every loop uses.

Three verdicts, decided once here for every caller (both consumers, the bridge, the
reconciler, the connections, the API's cache feed, the step publisher):

- `UNAVAILABLE` — a dependency is down or not serving writes: connection refused or reset,
  timeouts, Redis READONLY / OOM / LOADING / BUSY / TRYAGAIN / MASTERDOWN / CLUSTERDOWN,
  Kafka's retriable errors, Prefect unreachable. Retried for as long as it lasts; a message
  that met it is never dead-lettered and never committed past.
- `BOUNDED` — the dependency answered, but with an error that may or may not pass (an HTTP
  5xx or 429 from Prefect, an `OSError` that is not a connection error). Retried a bounded
  number of attempts and time, then treated as permanent: a deterministic 5xx must not hold
  a partition forever.
- `PERMANENT` — the message's own data is wrong (or `Permanent` was raised): no retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

import httpx
from aiokafka import errors as kafka_errors
from redis import exceptions as redis_errors

from core.logs import scrub

log = logging.getLogger(__name__)
T = TypeVar("T")


class Verdict(enum.Enum):
    UNAVAILABLE = "unavailable"
    BOUNDED = "bounded"
    PERMANENT = "permanent"


class Permanent(Exception):
    """An error that no retry can fix (unknown pipeline version, missing deployment...)."""


class Stopping(Exception):
    """Raised out of a retry loop when the process shuts down before the effect succeeded."""


class GaveUp(Exception):
    """A `BOUNDED` error that outlasted its attempts or time: now final for the caller."""

    def __init__(self, what: str, attempts: int, cause: BaseException) -> None:
        super().__init__(f"{what}: gave up after {attempts} attempts: {describe(cause)}")
        self.attempts = attempts


# Redis error replies (first word) that say "not now", not "never": a replica after a
# failover, a full server, a restart loading its data, a busy script, a cluster moving slots,
# a server whose RDB save fails (a full disk: MISCONF refuses writes until a save succeeds), an
# ACL denying this user a command (NOPERM: the server's configuration, never the data's).
REDIS_TRANSIENT_PREFIXES: Final = ("READONLY", "OOM", "LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN",
                                   "CLUSTERDOWN", "NOREPLICAS", "NOTREADY", "MISCONF", "NOPERM")
_REDIS_UNAVAILABLE: Final = (
    redis_errors.ConnectionError,  # BusyLoadingError is one
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    redis_errors.OutOfMemoryError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,  # MasterDownError is one
    redis_errors.MaxConnectionsError,
    redis_errors.NoPermissionError,  # NOPERM, its code stripped from the text by redis-py
)
_NETWORK: Final = (
    httpx.TransportError,  # connect/read/write errors and timeouts
    ConnectionError,  # refused, reset, aborted: the builtin OSError subclasses
    TimeoutError,
)
_HTTP_BOUNDED: Final = frozenset({408, 425, 429})
# An ACL denial met inside a script has no NOPERM code: Redis 7.0 says "ERR The user executing
# the script can't run this command or subcommand" (or "can't access at least one of the
# keys"), 7.2 "ERR ACL failure in script: ...". The server's configuration, never the data's.
_SCRIPT_ACL_DENIALS: Final = ("THE USER EXECUTING THE SCRIPT CAN'T", "ACL FAILURE IN SCRIPT")


def _redis_reply_transient(exc: redis_errors.ResponseError) -> bool:
    # Outside a script the reply starts with its code; inside one, Redis 7 also starts with it
    # ("READONLY ... script: ...") while Redis 6 wraps it ("ERR Error running script ...
    # -READONLY ..."): the first word, or a "-CODE" anywhere, says which it is.
    text = str(exc).upper()
    first = text.lstrip("-").split(" ", 1)[0]
    return first.startswith(REDIS_TRANSIENT_PREFIXES) or any(
        f"-{code}" in text for code in REDIS_TRANSIENT_PREFIXES) or any(
        denial in text for denial in _SCRIPT_ACL_DENIALS)


def classify(exc: BaseException) -> Verdict:
    """The verdict on an exception, following its chain (Prefect's and ensure-deployment code
    wrap transport errors in their own)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    verdict = Verdict.PERMANENT
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, Permanent | GaveUp):
            return Verdict.PERMANENT
        if isinstance(current, (*_REDIS_UNAVAILABLE, *_NETWORK)):
            return Verdict.UNAVAILABLE
        if isinstance(current, redis_errors.ResponseError) and _redis_reply_transient(current):
            return Verdict.UNAVAILABLE
        if isinstance(current, kafka_errors.KafkaError):
            if getattr(current, "retriable", False) or isinstance(
                    current, kafka_errors.KafkaConnectionError | kafka_errors.KafkaTimeoutError):
                return Verdict.UNAVAILABLE
            if isinstance(current, kafka_errors.BrokerResponseError):
                return Verdict.PERMANENT  # the broker refused this record: too large, bad topic...
            verdict = Verdict.BOUNDED
        elif isinstance(current, httpx.HTTPStatusError):
            status = current.response.status_code
            if status >= 500 or status in _HTTP_BOUNDED:
                verdict = Verdict.BOUNDED
        elif isinstance(current, OSError) and verdict is Verdict.PERMANENT:
            verdict = Verdict.BOUNDED
        current = current.__cause__ or current.__context__
    return verdict


def is_transient(exc: BaseException) -> bool:
    """Worth retrying at all (unavailable, or bounded and not yet exhausted)."""
    return classify(exc) is not Verdict.PERMANENT


def describe(exc: BaseException) -> str:
    """The error as one line for logs and dead-letter reasons. A URL's password in it is
    masked: httpx and Prefect quote the request's URL in their errors, and this text becomes
    a batch's `reason` (GET shows it) and a dead letter's header (kept on the topic)."""
    text = scrub(str(exc) or repr(exc))
    return text if isinstance(exc, Permanent | GaveUp) else f"{type(exc).__name__}: {text}"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential delays with ±20% jitter. `max_attempts` and `max_elapsed_s` bound
    `BOUNDED` errors only: an unavailable dependency is waited out however long it takes."""

    initial_s: float = 0.5
    cap_s: float = 30.0
    max_attempts: int = 8
    max_elapsed_s: float = 120.0

    def delays(self) -> Callable[[], float]:
        delay = self.initial_s

        def next_delay() -> float:
            nonlocal delay
            current = delay * random.uniform(0.8, 1.2)
            delay = min(delay * 2, self.cap_s)
            return current

        return next_delay


class Backoff:
    """Runs an attempt until it succeeds, under `policy`, cut short when `stopping` is set."""

    def __init__(self, stopping: asyncio.Event, policy: RetryPolicy | None = None) -> None:
        self._stopping = stopping
        self.policy = policy or RetryPolicy()
        self.retries = 0  # since start, for logs, metrics and tests

    async def call(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Returns the attempt's result. Raises a permanent error as is, `GaveUp` once a
        bounded error outlasted the policy, `Stopping` when shutdown begins meanwhile."""
        next_delay = self.policy.delays()
        started = time.monotonic()
        tries = bounded = 0
        while True:
            if self._stopping.is_set() and tries:
                raise Stopping(what)
            tries += 1
            try:
                return await attempt()
            except Exception as exc:
                verdict = classify(exc)
                if verdict is Verdict.PERMANENT:
                    raise
                if verdict is Verdict.BOUNDED:
                    bounded += 1
                    if (bounded >= self.policy.max_attempts
                            or time.monotonic() - started >= self.policy.max_elapsed_s):
                        raise GaveUp(what, bounded, exc) from exc
                self.retries += 1
                delay = next_delay()
                log.warning("%s: %s (%s), retry %d in %.1fs", what, verdict.value, describe(exc),
                            tries, delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()


async def retrying(what: str, attempt: Callable[[], Awaitable[T]], tries: int = 5,
                   policy: RetryPolicy | None = None) -> T:
    """Start-up connects: `tries` attempts whatever the error (logged), then the last is raised,
    so a process whose dependency never comes up fails visibly instead of hanging."""
    next_delay = (policy or RetryPolicy(cap_s=5.0)).delays()
    for n in range(1, tries + 1):
        try:
            return await attempt()
        except Exception as exc:
            if n == tries:
                raise
            delay = next_delay()
            log.warning("%s unavailable (%s), retry %d/%d in %.1fs", what, describe(exc), n,
                        tries, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")
