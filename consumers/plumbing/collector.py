"""The consumers process's policy for Python's cyclic garbage collector.

With Python's default (a young collection every 700 new container objects), the events
consumer spent about a fifth of its time collecting: a poll's records and events live for
two polls (decoded while the previous poll is applied), so every young collection found them
alive and promoted them, and the promotions triggered a full collection every few polls
(~13 ms each). Nearly nothing the consumers allocate is in a cycle: reference counting frees
it. So the process starts with what it imported frozen out of the collector's reach and
collects its young generation every `gc_young_objects` allocations (100,000: a few polls),
by when most of what a poll made is freed already. Measured by `make bench-e2e`'s apply part
in one process (`BENCHMARKS.md`, sixteenth session).
"""

from __future__ import annotations

import gc


def settle(young_objects: int) -> None:
    """Collects once, freezes what survives (what the process imported and set up so far)
    and sets the young generation's threshold; 0 leaves the collector as Python set it."""
    if young_objects <= 0:
        return
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(young_objects, older, oldest)
