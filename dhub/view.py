"""The live picture of a batch (rich): a header line, then one bar per step — its state, records
done, percent, rate and ETA — and with `verbose` one bar per partition under each step.

Percent and ETA need a total: they are shown when the step carries `totals` or `progress`
(issue 11, part 3); until then a running step's bar pulses and shows the records done (its
offsets summed). The rate is the API's `progress.records_per_s` when given, else measured here
from the offsets seen over the last `RATE_WINDOW_S`.
The live refresh runs on rich's thread and the updates on the caller's: a lock guards the state.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from rich.console import Console, ConsoleOptions, Group, JustifyMethod, RenderableType, RenderResult
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from dhub.models import Batch, Step, is_final

RATE_WINDOW_S: Final = 10.0
BAR_WIDTH: Final = 30
MIN_BAR_WIDTH: Final = 8
# What the other columns of a row take at most (label, state, records, percent, rate, ETA).
OTHER_COLUMNS: Final = 64
STATE_STYLES: Final = {"none": "dim", "pending": "yellow", "scheduled": "yellow", "running": "cyan",
                       "success": "green", "failed": "red", "stop": "bold"}
OUTCOME_STYLES: Final = {"completed": "green", "failed": "red", "crashed": "red", "cancelled": "yellow"}


class RateMeter:
    """Records per second over the last `RATE_WINDOW_S`, from (time, records done) samples."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, done: int, now: float) -> None:
        if self._samples and self._samples[-1][1] == done:
            return  # no progress: the old sample keeps the window's start honest
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] > RATE_WINDOW_S:
            self._samples.popleft()

    def rate(self, now: float) -> float | None:
        if len(self._samples) < 2:
            return None
        (t0, d0), (_, d1) = self._samples[0], self._samples[-1]
        span = now - t0
        return (d1 - d0) / span if span > 0.2 else None


@dataclass(frozen=True, slots=True)
class Figures:
    done: int
    total: int | None
    percent: float | None
    rate: float | None
    eta_s: float | None


def figures(step: Step, offsets: dict[str, int], totals: dict[str, int] | None,
            measured: float | None, use_progress: bool) -> Figures:
    done = sum(offsets.values())
    # A total only when every partition reported has one, as the API gives its percent:
    # over some partitions alone a step read 100% while it went on with the others.
    total = sum(totals.values()) if totals and totals.keys() >= offsets.keys() else None
    progress = step.get("progress", {}) if use_progress else {}
    percent = progress.get("percent")
    # As the API counts: each partition up to its own total (one past its total does not
    # make up for one short of it).
    counted = sum(min(offsets.get(part, 0), of) for part, of in (totals or {}).items())
    if percent is None and totals and total:
        # In whole numbers (a float's 100 * 29 / 100 is 28.999..., which a rounding down
        # would show as 28).
        percent = float(min(100, counted * 100 // total))
    rate = progress.get("records_per_s")
    if rate is None and step["state"] == "running":
        rate = measured
    eta = progress.get("eta_s")
    if eta is None and total is not None and rate:
        eta = max(0.0, (total - counted) / rate)
    if step["state"] != "running":
        eta = None
    return Figures(done, total, percent, rate, eta)


def _whole(percent: float | None) -> str:
    """A percent in whole numbers, rounded down: the API's 99.9 (9,996 of 10,000 records) must
    not be drawn as 100%, which means every record (the API rounds down for the same reason)."""
    if percent is None or not math.isfinite(percent):
        return ""
    return f"{math.floor(percent)}%"


def _count(n: float) -> str:
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if n >= size * 10:
            return f"{n / size:.1f}{unit}"
    return f"{n:,.0f}"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return (f"{hours}:" if hours else "") + f"{rest // 60:02d}:{rest % 60:02d}"


def _when(stamp: str | None) -> datetime | None:
    """An API time, or None when it is missing, unreadable or without a zone (which cannot be
    set against the clock: subtracting it raised TypeError, an internal error of `dhub get`)."""
    if not stamp:
        return None
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return when if when.tzinfo is not None else None


class BatchView:
    """What `dhub watch` draws; `update` with each version, render with rich (`Live`)."""

    def __init__(self, pipeline_id: str, *, verbose: bool = False) -> None:
        self._pipeline_id = pipeline_id
        self._verbose = verbose
        self._lock = threading.Lock()
        self._batch: Batch | None = None
        self._note: str | None = None
        self._meters: dict[tuple[str, str | None], RateMeter] = {}

    def update(self, batch: Batch | None, note: str | None = None) -> None:
        now = time.monotonic()
        with self._lock:
            self._note = note
            if batch is None:
                return
            self._batch = batch
            for name, step in batch["state"]["steps"].items():
                offsets = step["offsets"]
                self._meters.setdefault((name, None), RateMeter()).add(sum(offsets.values()), now)
                for partition, value in offsets.items():
                    self._meters.setdefault((name, partition), RateMeter()).add(value, now)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        # The bars give way on a narrow terminal, so a row never wraps (a live view that
        # wraps cannot be redrawn in place).
        width = max(MIN_BAR_WIDTH, min(BAR_WIDTH, options.max_width - OTHER_COLUMNS))
        with self._lock:
            yield self.render(time.monotonic(), width)

    def render(self, now: float, bar_width: int = BAR_WIDTH) -> RenderableType:
        batch = self._batch
        if batch is None:
            return Text(f"{self._pipeline_id}: waiting for the batch…", style="dim")
        final = is_final(batch)
        table = Table.grid(padding=(0, 1))
        justify: JustifyMethod
        for justify in ("left", "left", "left", "right", "right", "right", "right"):
            table.add_column(justify=justify)
        for name, step in batch["state"]["steps"].items():
            totals = step.get("totals")
            self._row(table, name, step, step["offsets"], totals, self._meters.get((name, None)),
                      now, final, bar_width, use_progress=True)
            if self._verbose:
                for partition in sorted(set(step["offsets"]) | set(totals or {})):
                    part_totals = {partition: totals[partition]} if totals and partition in totals else None
                    self._row(table, f"  {partition}", step, {partition: step["offsets"].get(partition, 0)},
                              part_totals, self._meters.get((name, partition)), now, final,
                              bar_width, use_progress=False)
        parts: list[RenderableType] = [self._header(batch), table]
        if self._note:
            parts.append(Text(self._note, style="yellow"))
        return Group(*parts)

    def _header(self, batch: Batch) -> Text:
        state = batch["state"]["state"]
        text = Text()
        text.append(f"{batch.get('pipeline_id', self._pipeline_id)} ", style="bold")
        text.append(batch["id"])
        if "pipeline_version" in batch:
            text.append(f"  v{batch['pipeline_version']}", style="dim")
        text.append("  ")
        text.append(state, style=STATE_STYLES.get(state, ""))
        outcome = batch.get("outcome")
        if outcome:
            text.append(f" ({outcome})", style=OUTCOME_STYLES.get(outcome, ""))
        # Where issue 11 part 3 puts the flag is the API's choice: the batch or its state.
        if batch.get("stalled") or batch["state"].get("stalled"):
            text.append("  stalled", style="bold red")
        started = _when(batch.get("created_at"))
        # A stopped batch's time ends at its last change: without one, none is shown (the
        # time until now would grow for as long as it is looked at).
        end = _when(batch.get("updated_at")) if is_final(batch) else datetime.now(UTC)
        if started is not None and end is not None:
            text.append(f"  {_duration((end - started).total_seconds())}", style="dim")
        return text

    def _row(self, table: Table, label: str, step: Step, offsets: dict[str, int],
             totals: dict[str, int] | None, meter: RateMeter | None, now: float, final: bool,
             bar_width: int, *, use_progress: bool) -> None:
        state = step["state"]
        measured = meter.rate(now) if meter is not None else None
        fig = figures(step, offsets, totals, measured, use_progress)
        style = STATE_STYLES.get(state, "")
        if fig.total is not None:
            bar = ProgressBar(total=max(fig.total, 1), completed=fig.done, width=bar_width)
        elif state in ("success", "failed"):
            bar = ProgressBar(total=1, completed=1, width=bar_width)
        else:  # no total: a running step pulses, the others are empty
            pulse = state == "running" and not final
            bar = ProgressBar(total=None if pulse else 1, completed=0, pulse=pulse, width=bar_width)
        bar.complete_style = bar.finished_style = style or "bar.complete"
        stalled = step.get("stalled") or step.get("progress", {}).get("stalled")
        done = f"{fig.done:,}" + (f"/{fig.total:,}" if fig.total is not None else "") + " rec"
        table.add_row(
            Text(label, style="bold" if not label.startswith(" ") else "dim"),
            Text(state + (" stalled" if stalled else ""), style="bold red" if stalled else style),
            bar,
            done,
            _whole(fig.percent),
            f"{_count(fig.rate)}/s" if fig.rate else "",
            f"eta {_duration(fig.eta_s)}" if fig.eta_s is not None else "",
        )
