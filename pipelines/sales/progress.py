"""Walking a step's records: partitions interleaved, optionally throttled, with a fail point."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import TypeVar

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
    """Counts processed records per partition, reports them, paces and fails on demand."""

    def __init__(self, ctx: StepContext, totals: Mapping[str, int], *,
                 throttle: float | None, fail: bool) -> None:
        self._ctx = ctx
        self._totals = dict(totals)
        self._done = dict.fromkeys(totals, 0)
        self._throttle = throttle
        # Failing on purpose half way, so the failed step shows partial offsets.
        self._fail_after = sum(totals.values()) // 2 if fail else None
        if self._fail_after == 0 and not any(totals.values()):
            raise StepFailed(f"step {ctx.step} failed on purpose (fail_at) with no records")
        self._count = 0
        self._started = time.monotonic()
        for partition, total in self._totals.items():
            ctx.report(partition, 0, total)

    @property
    def done(self) -> dict[str, int]:
        return dict(self._done)

    def advance(self, partition: str, n: int = 1) -> None:
        """`n` more records of `partition` are processed."""
        if self._fail_after is not None and self._count + n > self._fail_after:
            raise StepFailed(
                f"step {self._ctx.step} failed on purpose (fail_at) after {self._count} records"
            )
        self._done[partition] += n
        self._count += n
        self._ctx.report(partition, self._done[partition], self._totals.get(partition))
        if self._throttle:
            # Sleep until the records done so far are due: a steady `throttle` records/s.
            ahead = self._count / self._throttle - (time.monotonic() - self._started)
            if ahead > 0:
                time.sleep(ahead)
