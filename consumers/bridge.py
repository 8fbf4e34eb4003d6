"""The Prefect bridge: dhub runs' flow-run and task-run state events, forwarded to Kafka.

Prefect's event stream (websocket `/events/out`) starts with a backfill of the events since
a given time, capped by the server at 15 minutes (PREFECT_SERVER_EVENTS_MAXIMUM_WEBSOCKET_
BACKFILL), then follows live events. The server drops live events for a subscriber whose
queue is full, so the bridge never relies on the live stream alone: every session ends after
`resync_s` and the next one replays, from the server's database, all that happened since
the previous one began (less a margin); events forwarded twice carry the same `event_id` and
Redis applies them once. The resume point (a checkpoint in Redis, for restarts) only moves
past events the broker acknowledged, and is bounded by when they were received, so a clock
running fast cannot push it into the future.

A backfill only finds what the server's event persister has written, and under a burst that
lags far behind (measured: 1,500 events received within 7 s, written over the next 17-30 s),
so the resume point never moves past the persister's frontier: the latest server receipt
time among events that came from the database (received before the session subscribed).
The persister writes in the order it received, so whatever the live stream dropped and the
database lacks yet was received after that frontier; the replay margin covers events that
occurred somewhat before the server received them. Outages longer than the backfill window
are the reconciler's to repair.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from typing import Final, cast

from aiokafka import AIOKafkaProducer
from prefect.events import Event as PrefectEvent
from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter
from redis.asyncio import Redis

from consumers.plumbing.acks import PendingAcks
from consumers.plumbing.options import ConsumerOptions
from consumers.plumbing.part import Clients, Part
from consumers.plumbing.prefect_stream import ReceiptSubscriber
from core import keys
from core.models import TAG_DHUB
from core.prefect_events import TAG_PREFIX, TranslateError, translate
from core.retry import describe
from core.settings import Settings

log = logging.getLogger(__name__)

MAX_BACKFILL: Final = timedelta(minutes=15)
KNOWN_RUNS: Final = 10_000
# Events handed to the producer and not yet acknowledged; beyond this the stream waits.
MAX_PENDING: Final = 5_000
SETTLE_AT_END_S: Final = 10.0
# Prefect's server drops live events for a subscriber whose queue (256) is full — which a
# burst faster than the server's fan-out fills whatever the subscriber does (measured: a
# subscriber doing nothing else received 260 of 1,500 events emitted in 1.6 s). The
# persisted events are complete, so every session ends after this long and the next one
# replays, from the database, everything since the previous session began.
RESYNC_S: Final = 30.0


def event_filter() -> EventFilter:
    """State changes of flow and task runs that carry the `dhub` tag (filtered by the server,
    so other flows' traffic never reaches the bridge)."""
    return EventFilter(
        event=EventNameFilter(prefix=["prefect.flow-run.", "prefect.task-run."],
                              exclude_name=["prefect.flow-run.heartbeat"]),
        related=EventRelatedFilter(id=[TAG_PREFIX + TAG_DHUB]),
    )


class PrefectBridge(Part):
    name = "bridge"

    def __init__(self, settings: Settings, options: ConsumerOptions | None = None, *,
                 checkpoint_key: str = keys.BRIDGE_CHECKPOINT, resync_s: float = RESYNC_S,
                 ) -> None:
        super().__init__()
        self.settings = settings
        self.options = options or ConsumerOptions()
        self.checkpoint_key = checkpoint_key
        self.resync_s = resync_s
        self._redis: Redis | None = None
        self._producer: AIOKafkaProducer | None = None
        # flow run id -> (pipeline_id, batch_id), for task-run events without tags.
        self._runs: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._acks = PendingAcks()
        # Settles one at a time, so a mark never moves ahead of an older batch's acks.
        self._settling = asyncio.Lock()
        self._newest: datetime | None = None  # the resume mark, every ack before it settled
        self._connected_at: datetime | None = None  # when the current session subscribed
        # The latest server receipt time of an event read from the database: the persister
        # has written everything received until then.
        self._persisted: datetime | None = None
        self._saved: datetime | None = None
        self._saved_at = 0.0
        self.forwarded = 0
        self.sessions = 0

    async def _open(self, clients: Clients, scope: contextlib.AsyncExitStack) -> None:
        self._redis = clients.redis
        self._producer = clients.producer
        # Closed before the clients it writes with (the scope closes in reverse).
        scope.push_async_callback(self._last_checkpoint)

    async def _last_checkpoint(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.shield(self._save_checkpoint(force=True))

    async def _loop(self) -> None:
        next_delay = self.options.retry_policy().delays()
        catch_up = True
        while not self.stopping.is_set():
            # Right after a (re)connect, the backfill lacks what the server has not
            # persisted yet (its event persister flushes every 5 s): the first session is
            # cut short and the next one replays the same window again.
            limit = self.options.bridge_catchup_s if catch_up else self.resync_s
            try:
                await self._session(limit)
            except Exception as exc:
                delay = next_delay()
                log.warning("bridge: event stream lost (%s); reconnecting in %.1fs",
                            describe(exc), delay)
                if await self.sleep(delay):
                    return
                catch_up = True
                continue
            next_delay = self.options.retry_policy().delays()
            catch_up = False

    async def _session(self, limit: float | None) -> None:
        """Follows the stream until `limit` seconds passed or the part stops; raises when
        the stream or an acknowledgement fails (the subscriber does not reconnect by itself:
        every reconnect goes through here, resumes from the settled mark and gets its
        catch-up)."""
        self.sessions += 1
        follow = asyncio.create_task(self._follow())
        settler = asyncio.create_task(self._settle_every())
        stop = asyncio.create_task(self.stopping.wait())
        try:
            await asyncio.wait({follow, settler, stop}, timeout=limit,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            for task in (follow, settler):
                if not task.done():
                    task.cancel()
            try:
                error: Exception | None = None
                for task in (follow, settler):
                    try:
                        await _ended(task)
                    except Exception as exc:
                        error = error or exc
                if error is not None:
                    raise error  # what ended the stream
                # What was sent before the end: bounded, a broker down at shutdown must
                # not hold the process (the checkpoint then stays behind it).
                async with asyncio.timeout(SETTLE_AT_END_S):
                    await self.settle()
            except BaseException:
                self._acks.drop()
                raise
        await self._save_checkpoint(force=True)

    async def since(self) -> datetime:
        """Where the stream should resume: the settled mark (this process's, or the
        checkpoint left by the last one) minus a margin, within the server's backfill
        window; without either, all of that window. Never later than now."""
        now = datetime.now(UTC)
        earliest = now - MAX_BACKFILL
        newest = self._newest
        if newest is None:
            assert self._redis is not None
            raw = cast(str | None, await self._redis.get(self.checkpoint_key))
            if not raw:
                return earliest
            try:
                newest = datetime.fromisoformat(raw)
            except ValueError:
                return earliest
        newest = min(newest, now)  # a checkpoint from the future (a clock running fast)
        return max(newest - timedelta(seconds=self.options.bridge_replay_margin_s), earliest)

    async def _follow(self) -> None:
        since = await self.since()
        self._connected_at = datetime.now(UTC)
        subscriber = ReceiptSubscriber(
            api_url=self.settings.prefect_api_url, filter=event_filter(),
            reconnection_attempts=0,
        )
        # The subscriber replays from its private `_backfill_since` on connect and
        # defaults it to one minute ago; there is no public way to resume from a checkpoint.
        setattr(subscriber, "_backfill_since", since)  # noqa: B010
        log.info("bridge: following Prefect events since %s", since.isoformat())
        async with subscriber:
            async for event in subscriber:
                self._note_persisted(subscriber.received(event.id))
                await self.forward(event, datetime.now(UTC))
        raise ConnectionError("Prefect closed the event stream")

    def _note_persisted(self, received: datetime | None) -> None:
        """Moves the persister's frontier to an event's server receipt time when it came
        from the database: received before this session subscribed, it cannot be live."""
        if received is None or self._connected_at is None or received >= self._connected_at:
            return
        if self._persisted is None or received > self._persisted:
            self._persisted = received

    async def forward(self, event: PrefectEvent, received: datetime | None = None) -> None:
        """Hands the event's translation to the producer without waiting for the broker.
        Its resume mark is when it occurred, but never later than when it was received: a
        worker whose clock runs ahead must not move the resume point into the future. One
        the broker already acknowledged (a replay) is not sent again."""
        assert self._producer is not None
        mark = min(event.occurred, received or datetime.now(UTC))
        if self._acks.delivered(event.id):
            self._acks.add([], mark)
            return
        try:
            events = translate(event.model_dump(mode="json"), self._runs)
        except TranslateError as exc:
            # Not one of ours to report (Prefect's own events always translate): skipped,
            # not raised, or the replay after the restart would meet it again, for ever.
            log.warning("bridge: Prefect event %s skipped: %s", event.id, exc)
            events = []
        futures = []
        for e in events:
            if e.flow_run_id is not None:
                self._remember(e.flow_run_id, e.pipeline_id, e.batch_id)
            # Keyed by batch id: one batch's events stay in order on one partition.
            futures.append(await self._producer.send(
                self.settings.topic_events, value=e.encode(), key=e.batch_id.encode()))
        self.forwarded += len(events)
        self._acks.add(futures, mark, [event.id])
        if len(self._acks) >= MAX_PENDING:
            await self.settle()  # the broker lags far behind: wait for it here

    async def settle(self) -> None:
        """Awaits the acks pending now; then their newest mark is the resume point, but
        within a session never past the persister's frontier: what the live stream dropped
        was received after it, may not be in the database yet, and the next session's
        backfill must cover it. Until an event from the database shows where the persister
        is, the resume point stays."""
        async with self._settling:
            mark = await self._acks.settle()
        if mark is None:
            return
        if self._connected_at is not None:
            if self._persisted is None:
                return
            mark = min(mark, self._persisted)
        if self._newest is None or mark > self._newest:
            self._newest = mark
        await self._save_checkpoint()

    async def _settle_every(self) -> None:
        while True:
            await asyncio.sleep(self.options.bridge_checkpoint_every_s)
            await self.settle()

    def _remember(self, flow_run_id: str, pipeline_id: str, batch_id: str) -> None:
        self._runs[flow_run_id] = (pipeline_id, batch_id)
        self._runs.move_to_end(flow_run_id)
        while len(self._runs) > KNOWN_RUNS:
            self._runs.popitem(last=False)

    async def _save_checkpoint(self, force: bool = False) -> None:
        newest = self._newest
        if newest is None or newest == self._saved:
            return
        if not force and time.monotonic() - self._saved_at < self.options.bridge_checkpoint_every_s:
            return
        try:
            assert self._redis is not None
            await self._redis.set(self.checkpoint_key, newest.isoformat())
        except Exception as exc:  # the checkpoint only shortens replays: never fatal
            log.warning("bridge: checkpoint not saved: %s", describe(exc))
            return
        self._saved = newest
        self._saved_at = time.monotonic()


async def _ended(task: asyncio.Task[None]) -> None:
    """Awaits a task that was cancelled or ended; re-raises its error, and a cancellation
    only when it is the current task that is being cancelled."""
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
