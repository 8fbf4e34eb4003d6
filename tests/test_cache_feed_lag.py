"""The change feed's lag measure (service.cache_feed), without a server: how long a change
can have waited, while a PING awaits its answer, is counted from when the last answered PING
was sent. Counted from the oldest unanswered PING instead, a change published just after an
answered one waited a PING interval more than the silence bound before the cache turned off."""

from __future__ import annotations

from service.cache import BatchCache
from service.cache_feed import CacheFeed


def test_a_change_behind_an_unanswered_ping_is_counted_from_the_last_answer() -> None:
    cache = BatchCache(silence_s=2.5)
    feed = CacheFeed(cache)
    # A PING sent at 0.0 and answered; a change published at 0.01; the next PING, sent at
    # ping_s, queued behind it on a feed that has stopped keeping up. (The send times are
    # what `_listen` records when it sends.)
    feed._pings.append(0.0)
    feed._on_reply(["pong", ""])
    assert feed.lag(0.5) == 0.0  # nothing awaited: nothing known to be behind
    feed._pings.append(cache.ping_s)
    # The change has waited 2.5 s at 2.51: the cache must go off then (within a tick), not
    # only once the unanswered PING itself is 2.5 s old (at ping_s + 2.5).
    assert feed.lag(2.51) > cache.silence_s
    feed._on_reply(["pong", ""])  # the backlog drained: everything before ping_s applied
    assert feed.lag(2.6) == 0.0
