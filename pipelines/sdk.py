"""The step SDK: what a step's code sees (`StepContext`) and how its progress is published.

The offset rule: a step reports an offset (`ctx.report(partition, offset)`) only once the
records up to it are durably written — whatever the step produces for them is on disk (or
committed) and will be there when the step runs again. The offsets a batch shows are then
exactly where it can go on from: a resumed batch (`POST .../resume`) hands each step the
offsets its predecessor reached (`ctx.start_offset(partition)`), and the step continues from
there, neither losing nor repeating records. `ctx.checkpoints(totals, save)`
(`pipelines.checkpoints`) makes the rule the easy path: the step counts records, and its
`save(offsets)` runs before the offsets are reported.

A step is a plain function `step(ctx) -> None`, sync or async. Sync steps run in a worker
thread, so `ctx.report()` is thread-safe and never blocks on Kafka: it only records the
latest offset per partition. A publisher task on the event loop turns those records into
at most one `step.offsets` event every `interval_s` (only the partitions that changed), and
the step's end flushes the rest and waits for the broker's acknowledgement before the step
is declared `success`, so the final offsets are never lost behind a finished step.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from types import MappingProxyType
from typing import Any, TypeAlias, cast

from core.models import MAX_OFFSET, valid_id
from core.settings import Settings
from pipelines.checkpoints import CHECKPOINT_INTERVAL_S, Checkpoints, Save
from pipelines.offsets import REPORT_INTERVAL_S, OffsetBook, OffsetPump, publish_offsets
from pipelines.publisher import EventPublisher

log = logging.getLogger(__name__)

# Bound on publishing a failed step's last offsets and `failed`: the error is what matters.
FAILED_STATE_TIMEOUT_S = 5.0


class StepFailed(RuntimeError):
    """Raised by step code for an expected, explained failure (bad input, `fail_at`)."""


class StepAborted(RuntimeError):
    """Raised by `report()` once the step was cancelled: a sync step running in a thread
    cannot be interrupted, so it stops at its next report instead of running on unseen."""


class StepContext:
    """What a step's code receives: its identity (`batch_id`, `pipeline_id`, `step`), its
    read-only `config` (the batch's effective config of the step), the process `settings`,
    where each partition starts (`start_offset`), the batch it resumes (`resumed_from`, whose
    data the step may need), and `report()`."""

    def __init__(self, *, batch_id: str, pipeline_id: str, step: str,
                 config: Mapping[str, Any], settings: Settings, book: OffsetBook,
                 on_change: Callable[[], None], start: Mapping[str, int] | None = None,
                 resumed_from: str | None = None) -> None:
        self.batch_id = batch_id
        self.pipeline_id = pipeline_id
        self.step = step
        self.config: Mapping[str, Any] = MappingProxyType(dict(config))
        self.settings = settings
        self.resumed_from = resumed_from
        self.start_offsets: Mapping[str, int] = MappingProxyType(dict(start or {}))
        self._book = book
        self._on_change = on_change
        self._aborted = threading.Event()

    def start_offset(self, partition: str) -> int:
        """Records of `partition` already done when this step starts: 0, or on a resumed
        batch the offset the step reached before. Continue from the record after them."""
        return self.start_offsets.get(partition, 0)

    def checkpoints(self, totals: Mapping[str, int], save: Save, *,
                    start: Mapping[str, int] | None = None,
                    every_s: float | None = CHECKPOINT_INTERVAL_S) -> Checkpoints:
        """Counts the step's records from its start offsets and reports them only after
        `save(offsets)` made them durable (`pipelines.checkpoints`): the offset rule kept."""
        return Checkpoints(self, totals, save, start=start, every_s=every_s)

    def abort(self) -> None:
        """Makes the step's next `report()` raise `StepAborted` (called by the SDK)."""
        self._aborted.set()

    def report(self, partition: str, offset: int, total: int | None = None) -> None:
        """Records that `offset` records of `partition` are processed (`total`: of how many).

        Only once they are durably written (the offset rule, above): a resumed batch starts
        from the offsets reported. Cheap and thread-safe: call it as often as you like;
        publishing is coalesced. Offsets only grow: one below the partition's last report
        or its start offset raises ValueError (the batch would keep showing the higher one).
        """
        if self._aborted.is_set():
            raise StepAborted(f"step {self.step} was cancelled")
        if not valid_id(partition):
            raise ValueError(f"invalid partition name {partition!r}")
        for name, value in (("offset", offset), ("total", total)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= MAX_OFFSET):
                raise ValueError(f"invalid {name} {value!r} for {partition!r}")
        start = self.start_offsets.get(partition, 0)
        if offset < start:
            # The batch shows the start offset from the start: it would keep showing it.
            raise ValueError(f"offset {offset} of {partition!r} is below {start}, where the "
                             f"step started: offsets only grow")
        if self._book.record(partition, offset, total):
            self._on_change()

    @property
    def offsets(self) -> dict[str, int]:
        """The latest offset reported per partition (published or not yet)."""
        return self._book.offsets()

    @property
    def totals(self) -> dict[str, int]:
        """The totals given to `report()` (published with the offsets: percent and ETA,
        once every partition reported has its total)."""
        return self._book.totals()


SyncStep: TypeAlias = Callable[[StepContext], None]
AsyncStep: TypeAlias = Callable[[StepContext], Awaitable[None]]
StepFn: TypeAlias = SyncStep | AsyncStep


async def _call(fn: StepFn, ctx: StepContext) -> None:
    if inspect.iscoroutinefunction(fn):
        await cast(AsyncStep, fn)(ctx)
        return
    # Sync step code runs in a thread so the loop stays free to publish its offsets.
    result = await asyncio.to_thread(fn, ctx)
    if inspect.isawaitable(result):
        await result


@asynccontextmanager
async def step_scope(events: EventPublisher, step: str, config: Mapping[str, Any],
                     settings: Settings, *, start: Mapping[str, int] | None = None,
                     resumed_from: str | None = None,
                     interval_s: float = REPORT_INTERVAL_S) -> AsyncIterator[StepContext]:
    """`running` on entry; on exit the final offsets, then `success` or `failed`.

    An error (the step's, or a final flush that could not be delivered) publishes `failed`
    and propagates, so the step and the flow fail visibly instead of losing progress.
    """
    book = OffsetBook()
    pump = OffsetPump(events, step, book, interval_s)
    ctx = StepContext(batch_id=events.batch_id, pipeline_id=events.pipeline_id, step=step,
                      config=config, settings=settings, book=book, on_change=pump.notify,
                      start=start, resumed_from=resumed_from)
    await events.step_state(step, "running")
    pump.start()
    try:
        yield ctx
        await pump.flush()
    except Exception:
        ctx.abort()
        await _report_failure(events, step, book, pump)
        raise
    except BaseException:
        # Cancelled: when Prefect cancels a flow run the process is being torn down and the
        # producer's own tasks are cancelled too, so nothing can be sent from here. The
        # flow's cancellation hook reports the step as failed (see `pipelines.state_hooks`).
        ctx.abort()
        raise
    await events.step_state(step, "success")


async def _report_failure(events: EventPublisher, step: str, book: OffsetBook,
                          pump: OffsetPump) -> None:
    """Best effort and bounded: the offsets reached so far, then `failed`."""
    try:
        async with asyncio.timeout(FAILED_STATE_TIMEOUT_S):
            await pump.stop(graceful=False)
            changed = book.take()
            if changed:
                # Split as the pump splits: one event of them all may be over Kafka's limit,
                # and then `failed` (sent after) would never go out either.
                await publish_offsets(events, step, book, changed)
            await events.step_state(step, "failed")
    except Exception:
        log.warning("could not publish the failure of step %s", step, exc_info=True)


async def run_step(fn: StepFn, events: EventPublisher, step: str, config: Mapping[str, Any],
                   settings: Settings, *, start: Mapping[str, int] | None = None,
                   resumed_from: str | None = None,
                   interval_s: float = REPORT_INTERVAL_S) -> StepContext:
    """Runs one step's code inside its scope; returns the context (offsets, totals) after.
    `start`: each partition's start offset (a resumed batch's); `resumed_from`: its old id."""
    async with step_scope(events, step, config, settings, start=start,
                          resumed_from=resumed_from, interval_s=interval_s) as ctx:
        await _call(fn, ctx)
    return ctx
