"""The Prefect bridge: dhub runs' flow-run and task-run state events, forwarded to Kafka.

Prefect's event stream (websocket `/events/out`) starts with a backfill of the events since
a given time, capped by the server at 15 minutes (PREFECT_SERVER_EVENTS_MAXIMUM_WEBSOCKET_
BACKFILL). The bridge keeps a checkpoint in Redis — the newest event time it has forwarded —
and on (re)start asks to replay from a margin before it, so a restart shorter than the
backfill window loses nothing; events forwarded twice carry the same `event_id` and Redis
applies them once. Longer outages are the reconciler's to repair.
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
from prefect.events.clients import PrefectEventSubscriber
from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter
from redis.asyncio import Redis

from consumers.emit import Emitter
from consumers.options import ConsumerOptions
from consumers.part import Part, close_all
from core import keys
from core.connections import open_producer, open_redis
from core.models import TAG_DHUB
from core.prefect_events import TAG_PREFIX, translate
from core.retry import Backoff, Stopping, describe
from core.settings import Settings

log = logging.getLogger(__name__)

MAX_BACKFILL: Final = timedelta(minutes=15)
KNOWN_RUNS: Final = 10_000


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
                 checkpoint_key: str = keys.BRIDGE_CHECKPOINT) -> None:
        super().__init__()
        self.settings = settings
        self.options = options or ConsumerOptions()
        self.checkpoint_key = checkpoint_key
        self.backoff = Backoff(self.stopping, self.options.retry_policy())
        self._redis: Redis | None = None
        self._producer: AIOKafkaProducer | None = None
        # flow run id -> (pipeline_id, batch_id), for task-run events without tags.
        self._runs: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._newest: datetime | None = None
        self._saved: datetime | None = None
        self._saved_at = 0.0
        self.forwarded = 0

    async def start(self) -> None:
        self._redis = await open_redis(self.settings)
        self._producer = await open_producer(self.settings)
        self.emitter = Emitter(self._producer, self.settings.topic_events)

    async def close(self) -> None:
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._save_checkpoint(force=True))
        await close_all(self._producer, self._redis)

    async def _loop(self) -> None:
        delay = self.options.retry_initial_s
        catch_up = True
        while not self.stopping.is_set():
            # Right after a (re)connect, the backfill lacks what the server has not
            # persisted yet (its event persister flushes every 5 s): the first session is
            # cut short and the next one replays the same window again.
            limit = self.options.bridge_catchup_s if catch_up else None
            try:
                await self._session(limit)
            except Stopping:
                return  # Kafka down at shutdown: the checkpoint was not moved past it
            except Exception as exc:
                log.warning("bridge: event stream lost (%s); reconnecting in %.1fs",
                            describe(exc), delay)
                if await self.sleep(delay):
                    return
                delay = min(delay * 2, self.options.retry_max_s)
                catch_up = True
                continue
            delay = self.options.retry_initial_s
            catch_up = False

    async def _session(self, limit: float | None) -> None:
        """Follows the stream until `limit` seconds passed or the part stops; raises when
        the stream fails (the subscriber does not reconnect by itself: every reconnect
        goes through here and gets its catch-up)."""
        follow = asyncio.create_task(self._follow())
        stop = asyncio.create_task(self.stopping.wait())
        try:
            await asyncio.wait({follow, stop}, timeout=limit,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not follow.done():
                follow.cancel()
            try:
                await follow  # re-raises what ended the stream
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # this task is being cancelled, not just the stream
        await self._save_checkpoint(force=True)

    async def since(self) -> datetime:
        """Where the stream should resume: the newest event forwarded (this process's, or
        the checkpoint left by the last one) minus a margin, within the server's backfill
        window; without either, all of that window."""
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
        return max(newest - timedelta(seconds=self.options.bridge_replay_margin_s), earliest)

    async def _follow(self) -> None:
        since = await self.since()
        subscriber = PrefectEventSubscriber(
            api_url=self.settings.prefect_api_url, filter=event_filter(),
            reconnection_attempts=0,
        )
        # The subscriber replays from its private `_backfill_since` on connect and
        # defaults it to one minute ago; there is no public way to resume from a checkpoint.
        setattr(subscriber, "_backfill_since", since)  # noqa: B010
        log.info("bridge: following Prefect events since %s", since.isoformat())
        async with subscriber:
            async for event in subscriber:
                await self.forward(event)
        raise ConnectionError("Prefect closed the event stream")

    async def forward(self, event: PrefectEvent) -> None:
        events = translate(event.model_dump(mode="json"), self._runs)
        for e in events:
            if e.flow_run_id is not None:
                self._remember(e.flow_run_id, e.pipeline_id, e.batch_id)
        if events:
            await self.backoff.call("forward prefect event", lambda: self.emitter.publish(events))
            self.forwarded += len(events)
        occurred = event.occurred
        if self._newest is None or occurred > self._newest:
            self._newest = occurred
        await self._save_checkpoint()

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
