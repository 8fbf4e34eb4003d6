"""The easy way to keep the step SDK's offset rule: a step reports an offset only once the
records up to it are durably written (`pipelines.sdk`).

A step counts its records with `advance()`; every `every_s` this calls the step's own
`save(offsets)` — the code that makes everything up to those offsets durable (an fsync'd
file, a committed transaction) — and only when `save` has returned reports the offsets.
So a reported offset is always one the step can resume from, and a step written this way
follows the rule without thinking about it: it cannot report first by mistake.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.sdk import StepContext

# How often a step saves and reports by default: often enough for a live progress bar,
# rarely enough that an fsync per save costs little.
CHECKPOINT_INTERVAL_S = 0.2

Save = Callable[[Mapping[str, int]], None]


class Checkpoints:
    """Per-partition positions from the step's start offsets; see the module's doc.

    `totals`: records per partition (reported with the offsets: percent, ETA); its keys are
    the partitions. `start`: positions to start from instead of the start offsets, for a
    step that saved further than it reported (it saved, then stopped before reporting).
    `every_s=None` saves only when asked (`save()`), e.g. a step whose output is one
    transaction."""

    def __init__(self, ctx: StepContext, totals: Mapping[str, int], save: Save, *,
                 start: Mapping[str, int] | None = None,
                 every_s: float | None = CHECKPOINT_INTERVAL_S) -> None:
        self._ctx = ctx
        self._totals = dict(totals)
        self._save = save
        self._every_s = every_s
        # Where each partition starts: the SDK's start offsets, or a step's own saved
        # positions (never behind them: what was reported was saved first).
        self.start = {p: ctx.start_offset(p) for p in totals}
        for partition, offset in (start or {}).items():
            if partition not in self.start:
                continue
            if offset < self.start[partition]:
                raise ValueError(f"{partition} cannot start at {offset}, before its start "
                                 f"offset {self.start[partition]}: records would be lost")
            self.start[partition] = offset
        self._done = dict(self.start)
        self._reported = dict(self.start)
        self._due = self._next_due()
        # Where the step starts is durable by definition (0, or where the batch resumed).
        for partition, offset in self.start.items():
            ctx.report(partition, offset, self._totals[partition])

    def _next_due(self) -> float:
        return time.monotonic() + self._every_s if self._every_s is not None else float("inf")

    def position(self, partition: str) -> int:
        """Records of `partition` done so far (from its start offset on)."""
        return self._done[partition]

    @property
    def positions(self) -> dict[str, int]:
        return dict(self._done)

    @property
    def processed(self) -> dict[str, int]:
        """Records this run of the step processed per partition (not those before its start)."""
        return {p: self._done[p] - self.start[p] for p in self._done}

    def advance(self, partition: str, n: int = 1) -> None:
        """`n` more records of `partition` are processed (not yet durable: `save` makes them)."""
        self._done[partition] += n
        if time.monotonic() >= self._due:
            self.save()

    def save(self) -> None:
        """`save(positions)` now, then report what moved."""
        done = dict(self._done)
        self._save(done)
        for partition, offset in done.items():
            if offset != self._reported[partition]:
                self._ctx.report(partition, offset, self._totals[partition])
                self._reported[partition] = offset
        self._due = self._next_due()
