"""An in-process cache of rendered batch objects, never stale beyond a bound.

Every script that changes a batch hash publishes the hash's key on `keys.CHANGES_CHANNEL`; the
cache follows that channel and evicts. Three guards keep it honest:

- The feed is health-checked. Its connection is the cache's own (TCP keepalive, socket
  timeouts), and it is PINGed every `ping_s` (on a subscribed RESP2 connection the answer
  arrives as a `pong` message, in order with the invalidations). Once nothing at all has been
  heard for `silence_s`, or a PING has waited that long for its answer (the feed lags: it
  still delivers, late, what other API processes have already answered), a clock task
  independent of the feed's reads turns the cache off (emptied, serving nothing) until a new
  subscription is confirmed. A half-open connection (a NAT or load balancer that dropped the
  flow) or a backlog therefore costs at most `silence_s` (+ one `tick_s`) of staleness.
- Each entry carries a TTL (`ttl_s`): a backstop for changes made without a publish.
- A change message that carries the batch's new hash (`keys.CHANGES_CHANNEL`) replaces a
  held entry instead of evicting it; the value is rendered at once if the entry was read
  since its previous change, else on its first GET. Under steady
  event traffic a batch that is being watched therefore stays a hit, instead of every change
  costing one request a read of Redis. It is as exact as a read: Redis sends the messages in
  the order it ran the changes, and the swap is recorded like an eviction, so a fill that
  began before it is refused (unless its read saw that change: a rev at least the message's).
- Versions are ordered by the hash's `rev` (every script that changes a batch hash bumps
  it). The feed and the reads travel on different connections, and nothing orders a
  message's arrival with another connection's reply: a lagging feed delivers a change after
  a read that already saw it, or a newer one. An entry keeps its rev (from the fill's read or
  the message's hash); a message whose rev is not above the held one swaps nothing in, and a
  fill never replaces an unexpired entry of a higher rev. Rev 0 means unknown (no order).
- Invalidation is per key. `generation` is a sequence number that every eviction and reset
  advances; a reader notes it before reading Redis and offers the value with it. The value is
  refused only if THAT key was evicted (or the cache reset) since, by a change whose rev is
  unknown or above the value's: traffic on other batches no longer voids the fill.
  Evictions are remembered in a bounded ring (`recent_max` keys); a fill that began before
  the last eviction the ring forgot is refused, which is safe (it only costs one more read
  of Redis later).

The hot path (`lookup`) is a flag test, a dict lookup and a float comparison against a clock
(`now`) that the feed's clock task updates every `tick_s`: no time call per hit. The feed
itself (subscription, health checks, silence bound) is `service.cache_feed`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable

import orjson
from redis.asyncio import Redis

from core.layout import is_visible, published_fields, render
from core.packing import unpacked
from service.cache_feed import CacheFeed

log = logging.getLogger(__name__)

DEFAULT_SILENCE_S = 2.5
DEFAULT_TTL_S = 10.0
# (the rendered body or a published hash not rendered yet, expiry, the body's ETag or None,
# the hash's rev or 0 if unknown, whether a read was served it since its last change)
Entry = tuple[bytes | str, float, str | None, int, bool]


class BatchCache:
    def __init__(self, max_entries: int = 50_000, *, silence_s: float = DEFAULT_SILENCE_S,
                 ttl_s: float = DEFAULT_TTL_S, ping_s: float | None = None,
                 tick_s: float = 0.1, recent_max: int = 4096) -> None:
        if not 0 < tick_s < silence_s:
            raise ValueError("the cache needs 0 < tick_s < silence_s")
        # key -> (the rendered body, or the published hash not rendered yet; expiry; the
        # body's ETag, None until rendered)
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        # Called with the key of every change and the hash its message carried (None if it
        # carried none), or (None, None) when anything may have changed (a reset): how held
        # requests and streams learn of changes (service.waiters).
        self.on_change: Callable[[str | None, str | None], None] | None = None
        self._max = max_entries
        self.silence_s = silence_s
        self.ttl_s = ttl_s if ttl_s > 0 else math.inf
        self.ping_s = ping_s if ping_s is not None else silence_s / 3
        self.tick_s = tick_s
        # key -> (generation, rev or 0) of its last change, oldest first; `_floor`: refuse
        # fills that began before the newest change the ring has forgotten (or the last reset).
        self._recent: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._recent_max = recent_max
        self._floor = 0
        self.generation = 0
        self.live = False
        self.hits = 0
        self.misses = 0
        self.outages = 0  # times the cache went from serving to off
        self.now = time.monotonic()  # the clock entries expire against
        self.heard = self.now  # when the feed last said anything

    def __len__(self) -> int:
        return len(self._entries)

    def remembered(self) -> int:
        """How many evictions are kept for racing fills (bounded by `recent_max`)."""
        return len(self._recent)

    # -- the request path ------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        entry = self.lookup(key)
        return entry[0] if entry is not None else None  # type: ignore[return-value]

    def lookup(self, key: str, named: Callable[[str], bool] | None = None) -> Entry | None:
        """The entry of `key` as (body, expiry, etag, rev, read), or None on a miss. With
        `named` (a test of the entry's ETag), an entry failing it is a miss too: the caller
        reads Redis instead."""
        if not self.live:
            self.misses += 1  # the read goes to Redis: a miss as much as any other
            return None
        entry: Entry | None = self._entries.get(key)
        if entry is None or entry[1] < self.now:
            self.misses += 1
            return None
        if entry[2] is None:
            entry = self._render(key, entry)
        if entry is None or (named is not None and not named(entry[2])):  # type: ignore[arg-type]
            self.misses += 1
            return None
        if not entry[4]:  # its first read since it changed: its next change is rendered at once
            entry = self._entries[key] = (entry[0], entry[1], entry[2], entry[3], True)
        self.hits += 1
        return entry

    def _render(self, key: str, entry: Entry) -> Entry | None:
        try:
            body = published_body(entry[0])  # type: ignore[arg-type]
        except Exception:  # malformed: the request reads Redis (and answers its error)
            log.exception("cache: a published batch hash could not be rendered (%s)", key)
            body = None
        if body is None:
            self._entries.pop(key, None)
            return None
        entry = self._entries[key] = (body, entry[1], etag_of(body), entry[3], entry[4])
        return entry

    def put(self, key: str, value: bytes, generation: int, rev: int = 0) -> None:
        """Stores a value of `rev` whose read began at `generation`, unless its key changed
        since then (or the cache reset) by a change the read may not have seen, or an entry
        of a higher rev is held."""
        if not self.live or generation < self._floor:
            return
        changed = self._recent.get(key)
        # A change after the read began is harmless only if its rev is known and the read
        # saw it (a rev at least as high): a lagging feed delivers changes reads already saw.
        if changed is not None and changed[0] > generation and not (0 < changed[1] <= rev):
            return
        held = self._entries.get(key)
        # An expired entry may be replaced by a lower rev: the TTL is the backstop for
        # writes made without a message (a rebuild may restore a lower rev).
        if held is not None and rev < held[3] and held[1] >= self.now:
            return
        self._entries[key] = (value, self.now + self.ttl_s, etag_of(value), rev, True)
        if len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def evict(self, key: str) -> None:
        self._changed(key, None, 0)
        self._entries.pop(key, None)

    def update(self, key: str, published: str) -> None:
        """A change of `key` whose message carried the new hash: a held entry of a lower rev
        takes it (a higher or equal one already shows it, or a change after it)."""
        rev = published_rev(published)
        self._changed(key, published, rev)
        held = self._entries.get(key)
        if held is not None and not (rev and rev <= held[3]):
            entry = self._entries[key] = (published, self.now + self.ttl_s, None, rev, False)
            if held[4]:
                # Read since its previous change (or filled by a read): a batch being watched,
                # rendered now rather than in its next GET. Renders back to back in the feed's
                # loop cost less than one inside each GET (BENCHMARKS.md, seventeenth
                # session), and there are no more of them than reads: an entry nobody read
                # since its last change waits for its GET.
                self._render(key, entry)

    def _changed(self, key: str, published: str | None, rev: int) -> None:
        if self.on_change is not None:
            self.on_change(key, published)
        self.generation += 1
        recent = self._recent
        recent[key] = (self.generation, rev)
        recent.move_to_end(key)
        if len(recent) > self._recent_max:
            _, (forgotten, _) = recent.popitem(last=False)
            self._floor = forgotten

    def reset(self, live: bool) -> None:
        if self.live and not live:
            self.outages += 1
        if self.on_change is not None:
            self.on_change(None, None)
        self.generation += 1
        self._floor = self.generation
        self._entries.clear()
        self._recent.clear()
        self.live = live

    async def follow(self, redis: Redis, channel: str) -> None:
        """Runs until cancelled, keeping the cache in step with the change feed on `channel`
        (service.cache_feed)."""
        await CacheFeed(self).run(redis, channel)


def etag_of(body: bytes) -> str:
    """A strong ETag of a rendered batch: it changes exactly when the body does."""
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


def published_rev(published: str) -> int:
    """The `rev` of a published hash (`core.layout.published_fields`: a JSON object, or an
    older consumer's array field, value, ...), 0 if it has none; found without parsing the
    JSON (the feed carries one per change of any batch). A `"rev":"<digits>"` (or
    `"rev","<digits>"`) after `{`, `[` or `,` can only be that field and its value: a quote
    inside a value is escaped, and no field name is all digits."""
    for pattern in ('"rev":"', '"rev","'):
        start = 0
        while (at := published.find(pattern, start)) > 0:
            start = at + 7
            end = published.find('"', start)
            digits = published[start:end]
            if published[at - 1] in "{[," and digits.isascii() and digits.isdigit():
                return int(digits)
    return 0


def rev_of(fields: dict[str, str]) -> int:
    """The `rev` of a batch hash as read, 0 if it has none."""
    rev = fields.get("rev", "")
    return int(rev) if rev.isascii() and rev.isdigit() else 0


def published_body(published: str) -> bytes | None:
    """The API's body for a published batch hash; None if the batch is hidden."""
    # Never packed today (APPLY_EVENTS publishes the hashes it changes, never a packed
    # one), and read as the store reads a hash if that changes.
    fields = published_fields(published)
    if not is_visible(fields):
        return None
    return orjson.dumps(render(unpacked(fields)))
