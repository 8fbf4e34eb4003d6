"""A step's offsets on their way out: `OffsetBook` keeps the latest reported offset (and
total) per partition, written from the step's thread; `OffsetPump` publishes the changed
ones from the event loop, at most one `step.offsets` event per interval, and flushes the rest
(waiting for Kafka's acknowledgement) when the step ends. `pipelines.sdk` wires them to
`StepContext.report`."""

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
        """Stores a report; True when it is the first change since the last `take`."""
        with self._lock:
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
                await asyncio.wait_for(self._closing.wait(), self._interval_s)
            if self._closing.is_set():
                return

    async def _publish_changes(self, *, final: bool) -> None:
        changed = self._book.take()
        if not changed:
            return
        try:
            await self._events.step_offsets(self._step, changed,
                                            self._book.totals_of(changed))
        except Exception:
            # Not delivered: the partitions stay marked and go out with the next event.
            self._book.give_back(changed)
            if final:
                raise
            log.warning("offsets of step %s not published yet; will retry", self._step,
                        exc_info=True)
            self._wake.set()
        except BaseException:
            # Cancelled mid-send: maybe not delivered, so keep them for the failure report.
            self._book.give_back(changed)
            raise

    async def stop(self, *, graceful: bool) -> None:
        """Ends the periodic publishing: graceful lets an in-flight event finish first."""
        task, self._task = self._task, None
        if task is None:
            return
        self._closing.set()
        self._wake.set()
        if not graceful:
            task.cancel()
        with suppress(asyncio.CancelledError):
            await task

    async def flush(self) -> None:
        """Publishes what is left and waits for Kafka's acknowledgement; raises on failure."""
        await self.stop(graceful=True)
        await self._publish_changes(final=True)
