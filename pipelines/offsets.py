"""A step's offsets on their way out: `OffsetBook` keeps the latest reported offset (and
total) per partition, written from the step's thread; `OffsetPump` publishes the changed
ones from the event loop, at most one `step.offsets` event per interval, and flushes the rest
(waiting for Kafka's acknowledgement) when the step ends. `pipelines.sdk` wires them to
`StepContext.report`.

Kafka refuses a record over 1 MB, and nothing bounds how many partitions a step has: the
changed offsets go out split into events of at most `OFFSETS_EVENT_BYTES` each
(`publish_offsets`), sent one after the other on the batch's key, so they keep their order.
Each partition is in one event of a round, and offsets only move forward where they land, so
a part given back and sent again changes nothing."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable
from contextlib import suppress

from pipelines.publisher import EventPublisher

log = logging.getLogger(__name__)

# How often, at most, one step publishes its offsets (per step, all changed partitions).
REPORT_INTERVAL_S = 0.2
# Bytes of offsets and totals in one `step.offsets` event, at most: half the producer's 1 MB
# `max_request_size` (and the broker's `message.max.bytes`), leaving room for the envelope.
OFFSETS_EVENT_BYTES = 512 * 1024
# What one partition adds to an event besides its name, at most: two quotes, a colon, a comma
# and 16 digits (offsets stay below 2**53). Names are ASCII ids: characters are bytes.
_ENTRY_BYTES = 20


class OffsetBook:
    """Latest offset and optional total per partition, with the set changed since last taken.

    Written from the step's thread, read from the event loop: every access holds the lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offsets: dict[str, int] = {}
        self._totals: dict[str, int] = {}
        self._changed: dict[str, int] = {}

    def record(self, partition: str, offset: int, total: int | None) -> bool:
        """Stores a report; True when it is the first change since the last `take`.

        Raises ValueError for an offset below the partition's last one: a batch's offsets
        only grow (a lower update is ignored), so the batch would go on showing the higher
        one, and a resume would skip the records between."""
        with self._lock:
            last = self._offsets.get(partition, 0)
            if offset < last:
                raise ValueError(f"offset {offset} of {partition!r} is below {last}, reported "
                                 f"before: offsets only grow")
            first = not self._changed
            self._offsets[partition] = offset
            self._changed[partition] = offset
            if total is not None:
                self._totals[partition] = total
            return first

    def take(self) -> dict[str, int]:
        """The partitions changed since the last take, with their latest offsets."""
        with self._lock:
            changed, self._changed = self._changed, {}
            return changed

    def give_back(self, taken: dict[str, int]) -> None:
        """Re-marks partitions whose publishing failed, unless a newer report replaced them."""
        with self._lock:
            for partition, offset in taken.items():
                self._changed.setdefault(partition, offset)

    def offsets(self) -> dict[str, int]:
        with self._lock:
            return dict(self._offsets)

    def totals(self) -> dict[str, int]:
        with self._lock:
            return dict(self._totals)

    def totals_of(self, partitions: Iterable[str]) -> dict[str, int]:
        """The known totals of `partitions` (sent with their offsets)."""
        with self._lock:
            return {p: self._totals[p] for p in partitions if p in self._totals}


def split_changes(changed: dict[str, int],
                  budget: int = OFFSETS_EVENT_BYTES) -> list[dict[str, int]]:
    """`changed` in parts whose offsets and totals encode to at most `budget` bytes each (a
    bound counted from the names' lengths: cheaper than encoding, and never below the size)."""
    parts: list[dict[str, int]] = []
    part: dict[str, int] = {}
    size = 0
    for partition, offset in changed.items():
        cost = 2 * (len(partition) + _ENTRY_BYTES)  # in `offsets`, and again in `totals`
        if part and size + cost > budget:
            parts.append(part)
            part, size = {}, 0
        part[partition] = offset
        size += cost
    if part:
        parts.append(part)
    return parts


async def publish_offsets(events: EventPublisher, step: str, book: OffsetBook,
                          changed: dict[str, int]) -> None:
    """Publishes `changed` (taken from `book`) in events under the size bound, in order. On a
    failure (or a cancel mid-send) the parts not known delivered go back to the book, marked
    changed again, and the error propagates."""
    parts = split_changes(changed)
    for n, part in enumerate(parts):
        try:
            await events.step_offsets(step, part, book.totals_of(part))
        except BaseException:
            for undelivered in parts[n:]:
                book.give_back(undelivered)
            raise


class OffsetPump:
    """Publishes one step's offset changes: at most one event per interval, then a flush."""

    def __init__(self, events: EventPublisher, step: str, book: OffsetBook,
                 interval_s: float = REPORT_INTERVAL_S) -> None:
        self._events = events
        self._step = step
        self._book = book
        self._interval_s = interval_s
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def notify(self) -> None:
        """Called (from any thread) on the first report after a publish: wakes the pump."""
        self._loop.call_soon_threadsafe(self._wake.set)

    def start(self) -> None:
        self._task = self._loop.create_task(self._run(), name=f"offsets:{self._step}")

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if self._closing.is_set():
                return
            self._wake.clear()
            await self._publish_changes(final=False)
            # The rate limit: reports arriving meanwhile wait for the next event (or the flush).
            with suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s):
                    await self._closing.wait()
            if self._closing.is_set():
                return

    async def _publish_changes(self, *, final: bool) -> None:
        changed = self._book.take()
        if not changed:
            return
        try:
            # Not delivered (or cancelled mid-send: maybe not delivered): the partitions stay
            # marked, and go out with the next event or the failure report.
            await publish_offsets(self._events, self._step, self._book, changed)
        except Exception:
            if final:
                raise
            log.warning("offsets of step %s not published yet; will retry", self._step,
                        exc_info=True)
            self._wake.set()

    async def stop(self, *, graceful: bool) -> None:
        """Ends the periodic publishing: graceful lets an in-flight event finish first."""
        task, self._task = self._task, None
        if task is None:
            return
        self._closing.set()
        self._wake.set()
        if not graceful:
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            # The pump's end when cancelled above; a cancel of the caller (the step being
            # cancelled) is not ours to swallow, or the step would go on to report success.
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise

    async def flush(self) -> None:
        """Publishes what is left and waits for Kafka's acknowledgement; raises on failure."""
        await self.stop(graceful=True)
        await self._publish_changes(final=True)
