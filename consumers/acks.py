"""Broker acknowledgements awaited in batches, each guarding a resume mark.

The bridge hands events to the producer without waiting for the broker (a round trip per
event is slower than Prefect's bursts: its per-subscriber queue of 256 events overflows and
drops). What it sent is only safe once acknowledged, so the resume point moves past an
event only when every acknowledgement up to it has arrived: `settle` awaits all pending
ones and returns the newest mark they guarded, or raises the first failure (the caller then
replays from its last settled mark, and the broker gets the events again).
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any


def _retrieve(future: asyncio.Future[Any]) -> None:
    # A failed ack dropped with its session must not be reported as "never retrieved".
    if not future.cancelled():
        future.exception()


class PendingAcks:
    def __init__(self) -> None:
        self._futures: list[asyncio.Future[Any]] = []
        self._mark: datetime | None = None

    def __len__(self) -> int:
        return len(self._futures)

    def add(self, futures: list[asyncio.Future[Any]], mark: datetime) -> None:
        """Acknowledgements to await before `mark` may become the resume point."""
        for future in futures:
            future.add_done_callback(_retrieve)
        self._futures += futures
        if self._mark is None or mark > self._mark:
            self._mark = mark

    async def settle(self) -> datetime | None:
        """Awaits every ack pending now; the newest mark they guarded (None when nothing was
        pending). Added meanwhile: left for the next call."""
        futures, mark = self._futures, self._mark
        self._futures, self._mark = [], None
        if futures:
            await asyncio.gather(*futures)
        return mark

    def drop(self) -> None:
        """Forgets what is pending (the session ended; a replay sends it again)."""
        self._futures, self._mark = [], None
