"""Walking a step's records: partitions interleaved, saved at checkpoints, optionally
throttled, with a fail point."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import TypeVar

from pipelines.checkpoints import CHECKPOINT_INTERVAL_S, Save
from pipelines.sdk import StepContext, StepFailed

T = TypeVar("T")

# Records taken from one partition before moving to the next: every partition advances
# together, so a watcher sees all of their offsets grow.
CHUNK = 64


def interleave(streams: Mapping[str, Iterator[T]], chunk: int = CHUNK) -> Iterator[tuple[str, T]]:
    """(partition, item) pairs, `chunk` items of each partition in turn until all run dry."""
    active = dict(streams)
    while active:
        for partition in list(active):
            stream = active[partition]
            for _ in range(chunk):
                try:
                    item = next(stream)
                except StopIteration:
                    del active[partition]
                    break
                yield partition, item


class Progress:
    """A step's records counted from its start positions and saved at checkpoints (the
    SDK's `Checkpoints`: offsets are reported only once `save` made them durable), paced by
    `throttle`, and failing on purpose half way when `fail` (`fail_at`).

    `start`: where each partition starts (the step's saved positions, at or after the
    SDK's start offsets); its keys are the partitions. `keep_on_fail`: a failure on purpose
    saves first (the step's state is whole between records), so the failed step shows and
    keeps exactly what it did; a step whose save is its one transaction passes False."""

    def __init__(self, ctx: StepContext, totals: Mapping[str, int], save: Save, *,
                 throttle: float | None, fail: bool, start: Mapping[str, int] | None = None,
                 keep_on_fail: bool = True, every_s: float | None = CHECKPOINT_INTERVAL_S
                 ) -> None:
        self._ctx = ctx
        self._points = ctx.checkpoints(totals, save, start=start, every_s=every_s)
        self._throttle = throttle
        self._keep_on_fail = keep_on_fail
        # Failing on purpose half way, so the failed step shows partial offsets.
        self._fail_after = sum(totals.values()) // 2 if fail else None
        self._count = sum(self._points.positions.values())
        self._started = time.monotonic()
        self._check_fail()

    @property
    def start(self) -> dict[str, int]:
        return dict(self._points.start)

    @property
    def processed(self) -> dict[str, int]:
        """Records this run of the step processed, per partition."""
        return self._points.processed

    def advance(self, partition: str, n: int = 1) -> None:
        """`n` more records of `partition` are processed (and in the step's state)."""
        self._points.advance(partition, n)
        self._count += n
        self._check_fail()
        if self._throttle:
            # Sleep until the records done so far are due: a steady `throttle` records/s.
            done = sum(self._points.processed.values())
            ahead = done / self._throttle - (time.monotonic() - self._started)
            if ahead > 0:
                time.sleep(ahead)

    def catch_up(self, positions: Mapping[str, int]) -> None:
        """Moves partitions up to `positions` with no pacing and no fail point: records this
        run wrote again (one transaction over them all) where an earlier run's report of
        them reached the batch only in part."""
        for partition, offset in positions.items():
            behind = offset - self._points.position(partition)
            if behind > 0:
                self._points.advance(partition, behind)
                self._count += behind

    def finish(self) -> None:
        """The last save and report: every record is durable and reported."""
        self._points.save()

    def _check_fail(self) -> None:
        if self._fail_after is None or self._count < self._fail_after:
            return
        if self._keep_on_fail and self._count:
            self._points.save()
        raise StepFailed(
            f"step {self._ctx.step} failed on purpose (fail_at) after {self._count} records")
