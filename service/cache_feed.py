"""The GET cache's change feed: its own subscription to `keys.CHANGES_CHANNEL`, health-checked.

What it guarantees is written in `service.cache`: every message evicts or swaps an entry, the
cache turns off once the feed has been silent for `silence_s`, or has left a PING (sent every
`ping_s`, traffic or not) unanswered that long: a feed that lags, still delivering, is as
stale as a silent one. A resubscription resets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from core.retry import Backoff, RetryPolicy, describe

if TYPE_CHECKING:
    from service.cache import BatchCache

log = logging.getLogger(__name__)

# Options of the API's pool that belong to that pool (or are set below), not to a connection.
_NOT_COPIED = frozenset({
    "maint_notifications_pool_handler", "maint_notifications_config", "himport_registry",
    "orig_host_address", "orig_socket_timeout", "orig_socket_connect_timeout",
    "retry", "retry_on_error", "retry_on_timeout", "health_check_interval",
})


class FeedSilent(TimeoutError):
    """Nothing heard on the invalidation feed (not even a pong) within the silence bound."""


class CacheFeed:
    """Keeps one `BatchCache` in step with the change channel, and ticks its clock."""

    def __init__(self, cache: BatchCache) -> None:
        self.cache = cache
        # When each PING not yet answered was sent, oldest first. Hearing the feed is not
        # enough: a feed that lags (a backlog behind a busy process or a slow link) goes on
        # delivering, late, and would keep the cache live while it serves what other API
        # processes (and this one's reads) have long seen change. A PING's answer comes in
        # order with the messages: every change published before an answered PING was sent
        # has been applied.
        self._pings: deque[float] = deque()
        self._answered = 0.0  # when the last answered PING was sent (or the feed subscribed)

    async def run(self, redis: Redis, channel: str) -> None:
        """Runs until cancelled: subscribes on its own connection, evicts on every message,
        and resubscribes (with backoff) whenever the feed fails or falls silent."""
        client = self._feed_client(redis)
        backoff = Backoff(asyncio.Event(), RetryPolicy(initial_s=0.1, cap_s=2.0))
        clock = asyncio.create_task(self._clock())
        try:
            while True:
                _cancelled_meanwhile()
                try:
                    pubsub = await backoff.call("cache invalidation feed",
                                                lambda: self._subscribe(client, channel))
                except Exception as exc:  # permanent (auth, ACL...): keep trying, slowly
                    log.error("cache invalidation feed: %s; cache off", describe(exc))
                    await asyncio.sleep(backoff.policy.cap_s)
                    continue
                try:
                    await self._listen(pubsub)
                except Exception as exc:
                    log.warning("cache invalidation feed lost (%s); cache off until resubscribed",
                                describe(exc))
                finally:
                    self.cache.reset(live=False)
                    await self._close(pubsub)
        finally:
            clock.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await clock
            self.cache.reset(live=False)
            await client.aclose()

    def _feed_client(self, redis: Redis) -> Redis:
        """A client of its own for the subscription: the API's connection options, plus
        keepalive and deadlines, without retries (a reconnect must go through a reset)."""
        pool = redis.connection_pool
        options = {k: v for k, v in pool.connection_kwargs.items() if k not in _NOT_COPIED}
        # No socket_timeout: every step has a deadline of its own here.
        options.update(decode_responses=True, health_check_interval=0, protocol=2,
                       retry=Retry(NoBackoff(), 0), socket_timeout=None,
                       socket_connect_timeout=self.cache.silence_s)
        if issubclass(pool.connection_class, Connection):  # TCP or TLS, not a Unix socket
            options.update(socket_keepalive=True,
                           socket_keepalive_options=keepalive_options(self.cache.silence_s))
        return Redis.from_pool(ConnectionPool(connection_class=pool.connection_class,
                                              max_connections=2, **options))

    async def _subscribe(self, client: Redis, channel: str) -> PubSub:
        pubsub = client.pubsub()
        try:
            async with asyncio.timeout(self.cache.silence_s):
                await pubsub.subscribe(channel)
                while True:
                    message = await pubsub.get_message(timeout=self.cache.silence_s)
                    if message is not None and message["type"] == "subscribe":
                        break
        except BaseException:
            await self._close(pubsub)
            raise
        # Only now is every later change certain to reach us.
        self.cache.heard = self.cache.now = time.monotonic()
        self.cache.reset(live=True)
        return pubsub

    async def _listen(self, pubsub: PubSub) -> None:
        # Replies are read off the connection directly, under one deadline per slice of at
        # most `ping_s` rather than one per read: PubSub.get_message and a timer per message
        # cost several times more, and the feed carries one message per change of any batch.
        conn = pubsub.connection
        assert conn is not None
        self._pings.clear()  # a new connection: nothing sent on it is awaited
        self._answered = time.monotonic()  # subscribed (and the cache reset) since
        next_ping = 0.0
        while True:
            _cancelled_meanwhile()
            now = time.monotonic()
            if not self.cache.live:
                raise FeedSilent("the cache's clock found the feed silent or lagging")
            if (stale := self.stale(now)) is not None:
                raise FeedSilent(stale)
            # Every ping_s, traffic or not: the lag of a feed that is never quiet counts too.
            if now >= next_ping:
                async with asyncio.timeout(self.cache.ping_s):
                    await conn.send_command("PING", check_health=False)
                self._pings.append(now)
                next_ping = now + self.cache.ping_s
            slice_s = max(min(self.cache.ping_s, self.cache.heard + self.cache.silence_s - now), 0.001)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(slice_s):
                    while True:
                        # math.inf: no timer of its own (the slice's deadline bounds it).
                        reply = await conn.read_response(timeout=math.inf,
                                                         disconnect_on_error=False)
                        self.cache.heard = time.monotonic()
                        self._on_reply(reply)

    def _on_reply(self, reply: Any) -> None:
        """One RESP2 reply on a subscribed connection: [kind, channel, data] or [pong, data]."""
        kind = reply[0] if isinstance(reply, list) and reply else None
        if kind == "message":
            key, newline, published = reply[2].partition("\n")
            if newline:
                self.cache.update(key, published)
            else:
                self.cache.evict(key)
        elif kind == "subscribe":
            # The client library reconnected by itself: changes may have been missed, and
            # the PINGs sent on the old connection will never be answered.
            self._pings.clear()
            self._answered = time.monotonic()
            self.cache.reset(live=True)
        elif kind == "pong":
            if self._pings:
                self._answered = self._pings.popleft()
        else:
            raise ConnectionError(f"unexpected reply on the invalidation feed: {reply!r:.100}")

    def stale(self, now: float) -> str | None:
        """Why the feed can no longer be trusted at `now` (nothing heard, or behind, for
        longer than the silence bound), or None."""
        if (quiet := now - self.cache.heard) > self.cache.silence_s:
            return f"silent for {quiet:.1f}s"
        if (lag := self.lag(now)) > self.cache.silence_s:
            return f"{lag:.1f}s behind"
        return None

    def lag(self, now: float) -> float:
        """While a PING awaits its answer, how long ago the last answered one was sent (0
        otherwise): the longest any change can have waited. Measured from the oldest
        unanswered PING instead, a change published just after an answered one waited a
        PING interval more before the cache turned off."""
        return now - self._answered if self._pings else 0.0

    async def _clock(self) -> None:
        """Advances the entries' clock and enforces the silence bound (nothing heard, or a
        PING unanswered, for silence_s), whatever the feed's reads are doing."""
        while True:
            now = self.cache.now = time.monotonic()
            if self.cache.live and (stale := self.stale(now)) is not None:
                log.warning("cache invalidation feed %s; cache off until resubscribed", stale)
                self.cache.reset(live=False)
            await asyncio.sleep(self.cache.tick_s)

    @staticmethod
    async def _close(pubsub: PubSub) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed since redis 8.2


def _cancelled_meanwhile() -> None:
    """Raises if this task was cancelled but a library swallowed the CancelledError (redis-py
    did on Python 3.11, before `core.redis_connection`), so shutdown cannot wait on the
    follower forever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def keepalive_options(deadline_s: float) -> dict[int, int]:
    """Linux TCP options so the kernel, too, gives up on a dead peer within about the bound."""
    wanted = {"TCP_KEEPIDLE": 1, "TCP_KEEPINTVL": 1, "TCP_KEEPCNT": max(1, int(deadline_s)),
              "TCP_USER_TIMEOUT": int(deadline_s * 1000)}
    return {getattr(socket, name): value for name, value in wanted.items()
            if hasattr(socket, name)}
