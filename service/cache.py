"""An in-process cache of rendered batch objects, never stale beyond a bound.

Every script that changes a batch hash publishes the hash's key on `keys.CHANGES_CHANNEL`; the
cache follows that channel and evicts. Three guards keep it honest:

- The feed is health-checked. Its connection is the cache's own (TCP keepalive, socket
  timeouts), and it is PINGed whenever it has been quiet for `ping_s` (on a subscribed RESP2
  connection the answer arrives as a `pong` message, in order with the invalidations). Once
  nothing at all has been heard for `silence_s`, a clock task independent of the feed's reads
  turns the cache off (emptied, serving nothing) until a new subscription is confirmed. A
  half-open connection (a NAT or load balancer that dropped the flow) therefore costs at
  most `silence_s` (+ one `tick_s`) of staleness, never more.
- Each entry carries a TTL (`ttl_s`): a backstop for changes made without a publish.
- A change message that carries the batch's new hash (`keys.CHANGES_CHANNEL`) replaces a
  held entry instead of evicting it; the value is rendered on its first GET. Under steady
  event traffic a batch that is being watched therefore stays a hit, instead of every change
  costing one request a read of Redis. It is as exact as a read: Redis sends the messages in
  the order it ran the changes, and the swap is recorded like an eviction, so a fill that
  began before it is refused.
- Invalidation is per key. `generation` is a sequence number that every eviction and reset
  advances; a reader notes it before reading Redis and offers the value with it. The value is
  refused only if THAT key was evicted (or the cache reset) since: traffic on other batches no
  longer voids the fill. Evictions are remembered in a bounded ring (`recent_max` keys); a
  fill that began before the last eviction the ring forgot is refused, which is safe (it
  only costs one more read of Redis later).

The hot path (`get`) is a flag test, a dict lookup and a float comparison against a clock
that the clock task updates every `tick_s`: no time call per hit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections import OrderedDict
from typing import Any

import orjson
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from core.retry import Backoff, RetryPolicy, describe
from core.store import published_fields, render

log = logging.getLogger(__name__)

DEFAULT_SILENCE_S = 2.5
DEFAULT_TTL_S = 10.0
# Options of the API's pool that belong to that pool (or are set below), not to a connection.
_NOT_COPIED = frozenset({
    "maint_notifications_pool_handler", "maint_notifications_config", "himport_registry",
    "orig_host_address", "orig_socket_timeout", "orig_socket_connect_timeout",
    "retry", "retry_on_error", "retry_on_timeout", "health_check_interval",
})


class FeedSilent(TimeoutError):
    """Nothing heard on the invalidation feed (not even a pong) within the silence bound."""


class BatchCache:
    def __init__(self, max_entries: int = 50_000, *, silence_s: float = DEFAULT_SILENCE_S,
                 ttl_s: float = DEFAULT_TTL_S, ping_s: float | None = None,
                 tick_s: float = 0.1, recent_max: int = 4096) -> None:
        if not 0 < tick_s < silence_s:
            raise ValueError("the cache needs 0 < tick_s < silence_s")
        # key -> (the rendered body, or the published hash not rendered yet; expiry)
        self._entries: OrderedDict[str, tuple[bytes | str, float]] = OrderedDict()
        self._max = max_entries
        self.silence_s = silence_s
        self.ttl_s = ttl_s if ttl_s > 0 else math.inf
        self.ping_s = ping_s if ping_s is not None else silence_s / 3
        self.tick_s = tick_s
        # key -> generation of its last eviction, oldest first; `_floor`: refuse fills that
        # began before the newest eviction the ring has forgotten (or the last reset).
        self._recent: OrderedDict[str, int] = OrderedDict()
        self._recent_max = recent_max
        self._floor = 0
        self.generation = 0
        self.live = False
        self.hits = 0
        self.misses = 0
        self.outages = 0  # times the cache went from serving to off
        self._now = time.monotonic()  # the clock entries expire against
        self._heard = self._now  # when the feed last said anything

    def __len__(self) -> int:
        return len(self._entries)

    def remembered(self) -> int:
        """How many evictions are kept for racing fills (bounded by `recent_max`)."""
        return len(self._recent)

    # -- the request path ------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        if not self.live:
            return None
        entry = self._entries.get(key)
        if entry is None or entry[1] < self._now:
            self.misses += 1
            return None
        value = entry[0]
        if value.__class__ is not bytes:
            return self._render(key, entry)
        self.hits += 1
        return value

    def _render(self, key: str, entry: tuple[bytes | str, float]) -> bytes | None:
        try:
            body = published_body(entry[0])  # type: ignore[arg-type]
        except Exception:  # malformed: the request reads Redis (and answers its error)
            log.exception("cache: a published batch hash could not be rendered (%s)", key)
            body = None
        if body is None:
            self._entries.pop(key, None)
            self.misses += 1
            return None
        self._entries[key] = (body, entry[1])
        self.hits += 1
        return body

    def put(self, key: str, value: bytes, generation: int) -> None:
        """Stores a value whose read began at `generation`, unless its key was evicted (or the
        cache reset) since then."""
        if not self.live or generation < self._floor:
            return
        evicted = self._recent.get(key)
        if evicted is not None and evicted > generation:
            return
        self._entries[key] = (value, self._now + self.ttl_s)
        if len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def evict(self, key: str) -> None:
        self._changed(key)
        self._entries.pop(key, None)

    def update(self, key: str, published: str) -> None:
        """A change of `key` whose message carried the new hash: a held entry takes it."""
        self._changed(key)
        if key in self._entries:
            self._entries[key] = (published, self._now + self.ttl_s)

    def _changed(self, key: str) -> None:
        self.generation += 1
        recent = self._recent
        recent[key] = self.generation
        recent.move_to_end(key)
        if len(recent) > self._recent_max:
            _, forgotten = recent.popitem(last=False)
            self._floor = forgotten

    def reset(self, live: bool) -> None:
        if self.live and not live:
            self.outages += 1
        self.generation += 1
        self._floor = self.generation
        self._entries.clear()
        self._recent.clear()
        self.live = live

    # -- the invalidation feed -------------------------------------------------------------

    async def follow(self, redis: Redis, channel: str) -> None:
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
                    self.reset(live=False)
                    await self._close(pubsub)
        finally:
            clock.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await clock
            self.reset(live=False)
            await client.aclose()

    def _feed_client(self, redis: Redis) -> Redis:
        """A client of its own for the subscription: the API's connection options, plus
        keepalive and deadlines, without retries (a reconnect must go through a reset)."""
        pool = redis.connection_pool
        options = {k: v for k, v in pool.connection_kwargs.items() if k not in _NOT_COPIED}
        # No socket_timeout: redis-py then sends through asyncio.wait_for, which on Python 3.11
        # can swallow a cancellation (the app's shutdown). Every step has a deadline here.
        options.update(decode_responses=True, health_check_interval=0, protocol=2,
                       retry=Retry(NoBackoff(), 0), socket_timeout=None,
                       socket_connect_timeout=self.silence_s)
        if issubclass(pool.connection_class, Connection):  # TCP or TLS, not a Unix socket
            options.update(socket_keepalive=True,
                           socket_keepalive_options=keepalive_options(self.silence_s))
        return Redis.from_pool(ConnectionPool(connection_class=pool.connection_class,
                                              max_connections=2, **options))

    async def _subscribe(self, client: Redis, channel: str) -> PubSub:
        pubsub = client.pubsub()
        try:
            async with asyncio.timeout(self.silence_s):
                await pubsub.subscribe(channel)
                while True:
                    message = await pubsub.get_message(timeout=self.silence_s)
                    if message is not None and message["type"] == "subscribe":
                        break
        except BaseException:
            await self._close(pubsub)
            raise
        # Only now is every later change certain to reach us.
        self._heard = self._now = time.monotonic()
        self.reset(live=True)
        return pubsub

    async def _listen(self, pubsub: PubSub) -> None:
        # Replies are read off the connection directly, under one deadline per slice of at
        # most `ping_s` rather than one per read: PubSub.get_message and a timer per message
        # cost several times more, and the feed carries one message per change of any batch.
        conn = pubsub.connection
        assert conn is not None
        next_ping = 0.0
        while True:
            _cancelled_meanwhile()
            now = time.monotonic()
            if not self.live:
                raise FeedSilent("the cache's clock found the feed silent")
            quiet = now - self._heard
            if quiet > self.silence_s:
                raise FeedSilent(f"nothing heard for {quiet:.1f}s")
            if quiet >= self.ping_s and now >= next_ping:
                async with asyncio.timeout(self.ping_s):
                    await conn.send_command("PING", check_health=False)
                next_ping = now + self.ping_s
            slice_s = max(min(self.ping_s, self._heard + self.silence_s - now), 0.001)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(slice_s):
                    while True:
                        # math.inf: no timer of its own (the slice's deadline bounds it).
                        reply = await conn.read_response(timeout=math.inf,
                                                         disconnect_on_error=False)
                        self._heard = time.monotonic()
                        self._on_reply(reply)

    def _on_reply(self, reply: Any) -> None:
        """One RESP2 reply on a subscribed connection: [kind, channel, data] or [pong, data]."""
        kind = reply[0] if isinstance(reply, list) and reply else None
        if kind == "message":
            key, newline, published = reply[2].partition("\n")
            if newline:
                self.update(key, published)
            else:
                self.evict(key)
        elif kind == "subscribe":
            # The client library reconnected by itself: changes may have been missed.
            self.reset(live=True)
        elif kind != "pong":
            raise ConnectionError(f"unexpected reply on the invalidation feed: {reply!r:.100}")

    async def _clock(self) -> None:
        """Advances the entries' clock and enforces the silence bound, whatever the feed's
        reads are doing."""
        while True:
            now = self._now = time.monotonic()
            if self.live and now - self._heard > self.silence_s:
                log.warning("cache invalidation feed silent for %.1fs; cache off until "
                            "resubscribed", now - self._heard)
                self.reset(live=False)
            await asyncio.sleep(self.tick_s)

    @staticmethod
    async def _close(pubsub: PubSub) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await pubsub.aclose()  # type: ignore[no-untyped-call]


def published_body(published: str) -> bytes | None:
    """The API's body for a published batch hash; None if the batch is hidden."""
    fields = published_fields(published)
    if "deleted" in fields:
        return None
    return orjson.dumps(render(fields))


def _cancelled_meanwhile() -> None:
    """Raises if this task was cancelled but a library swallowed the CancelledError (seen with
    redis-py on Python 3.11), so shutdown cannot wait on the follower forever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def keepalive_options(deadline_s: float) -> dict[int, int]:
    """Linux TCP options so the kernel, too, gives up on a dead peer within about the bound."""
    wanted = {"TCP_KEEPIDLE": 1, "TCP_KEEPINTVL": 1, "TCP_KEEPCNT": max(1, int(deadline_s)),
              "TCP_USER_TIMEOUT": int(deadline_s * 1000)}
    return {getattr(socket, name): value for name, value in wanted.items()
            if hasattr(socket, name)}
