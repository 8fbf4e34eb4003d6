"""Broker acknowledgements awaited in batches, each guarding a resume mark.

The bridge hands events to the producer without waiting for the broker (a round trip per
event is slower than Prefect's bursts: its per-subscriber queue of 256 events overflows and
drops). What it sent is only safe once acknowledged, so the resume point moves past an
event only when every acknowledgement up to it has arrived: `settle` awaits all pending
ones and returns the newest mark they guarded, or raises the first failure (the caller then
replays from its last settled mark, and the broker gets the events again). It remembers
the keys of the latest acknowledged events, so that a replay need not send those again.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from datetime import datetime
from typing import Any, Final

REMEMBERED: Final = 50_000


def _retrieve(future: asyncio.Future[Any]) -> None:
    # A failed ack dropped with its session must not be reported as "never retrieved".
    if not future.cancelled():
        future.exception()


class PendingAcks:
    def __init__(self) -> None:
        self._futures: list[asyncio.Future[Any]] = []
        self._mark: datetime | None = None
        self._keys: list[Hashable] = []
        self._delivered: OrderedDict[Hashable, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._futures)

    def add(self, futures: list[asyncio.Future[Any]], mark: datetime,
            keys: Iterable[Hashable] = ()) -> None:
        """Acknowledgements to await before `mark` may become the resume point (and the
        events named by `keys` count as delivered)."""
        for future in futures:
            future.add_done_callback(_retrieve)
        self._futures += futures
        self._keys += keys
        if self._mark is None or mark > self._mark:
            self._mark = mark

    async def settle(self) -> datetime | None:
        """Awaits every ack pending now; the newest mark they guarded (None when nothing was
        pending). Added meanwhile: left for the next call."""
        futures, mark, keys = self._futures, self._mark, self._keys
        self._futures, self._mark, self._keys = [], None, []
        if futures:
            await asyncio.gather(*futures)
        for key in keys:
            self._delivered[key] = None
            self._delivered.move_to_end(key)
        while len(self._delivered) > REMEMBERED:
            self._delivered.popitem(last=False)
        return mark

    def delivered(self, key: Hashable) -> bool:
        """Whether the broker acknowledged the event of that key (among the latest)."""
        return key in self._delivered

    def drop(self) -> None:
        """Forgets what is pending (the session ended; a replay sends it again)."""
        self._futures, self._mark, self._keys = [], None, []
