"""Publishing a batch's events to Kafka from inside a running flow.

Every event of one batch is keyed by its batch id, so they share a partition and keep the
order they were sent in. A send is awaited until the broker acknowledged it (the producer
runs with acks=all and idempotence), and a send that failed for a reason `core.retry` calls
worth retrying is retried with the *same* event id until a deadline: a retry that doubles a
delivered event changes nothing (state order, final steps, max offsets), and a send that
still fails — or fails permanently (a record the broker will never take) — is raised, never
swallowed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

import anyio

from core.codec import MAX_REASON, Event
from core.connections import open_producer
from core.retry import RetryPolicy, Verdict, classify, describe
from core.settings import Settings

log = logging.getLogger(__name__)

# How long closing the producer may take when the publisher is left by an exception.
STOP_TIMEOUT_S = 2.0


class PublishError(RuntimeError):
    """An event could not be delivered to Kafka before the retry deadline."""


class Producer(Protocol):
    """The part of `aiokafka.AIOKafkaProducer` used here (aiokafka ships no type hints)."""

    async def send_and_wait(self, topic: str, value: bytes | None = None,
                            key: bytes | None = None) -> Any: ...

    async def stop(self) -> None: ...


class EventPublisher:
    """Sends one batch's events to the events topic, each awaited until acknowledged."""

    def __init__(self, producer: Producer, topic: str, batch_id: str, pipeline_id: str, *,
                 deadline_s: float = 30.0, first_backoff_s: float = 0.2) -> None:
        self.producer = producer
        self.topic = topic
        self.batch_id = batch_id
        self.pipeline_id = pipeline_id
        self.deadline_s = deadline_s
        self.first_backoff_s = first_backoff_s
        self._key = batch_id.encode()

    async def publish(self, event: Event) -> None:
        """Delivers `event`, retrying the identical message until the deadline passes."""
        value = event.encode()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.deadline_s
        next_delay = RetryPolicy(initial_s=self.first_backoff_s, cap_s=5.0).delays()
        attempt = 1
        while True:
            try:
                await self.producer.send_and_wait(self.topic, value=value, key=self._key)
                return
            except Exception as exc:
                backoff = next_delay()
                if classify(exc) is Verdict.PERMANENT or loop.time() + backoff > give_up:
                    raise PublishError(
                        f"{event.type} for {self.batch_id} not delivered after {attempt} "
                        f"attempts: {describe(exc)}"
                    ) from exc
                log.warning("kafka send of %s failed (%s), retry %d in %.1fs",
                            event.type, describe(exc), attempt, backoff)
                await asyncio.sleep(backoff)
                attempt += 1

    def _event(self, kind: str, **fields: Any) -> Event:
        return Event(type=kind, batch_id=self.batch_id, pipeline_id=self.pipeline_id, **fields)

    async def batch_state(self, state: str, *, outcome: str | None = None,
                          reason: str | None = None, flow_run_id: str | None = None,
                          ts: float | None = None) -> None:
        """`ts`: when the run entered the state, if not now (the latest stop decides the
        batch's outcome)."""
        if reason is not None and len(reason) > MAX_REASON:
            reason = reason[: MAX_REASON - 1] + "…"
        fields: dict[str, Any] = {"state": state, "outcome": outcome, "reason": reason,
                                  "flow_run_id": flow_run_id}
        if ts is not None:
            fields["ts"] = ts
        await self.publish(self._event("batch.state", **fields))

    async def step_state(self, step: str, state: str, ts: float | None = None) -> None:
        """`ts`: the end's time if not now; 0 for a guess any real end of the step replaces
        (APPLY_EVENTS keeps the later of a step's two final states)."""
        fields: dict[str, Any] = {"step": step, "state": state}
        if ts is not None:
            fields["ts"] = ts
        await self.publish(self._event("step.state", **fields))

    async def step_offsets(self, step: str, offsets: dict[str, int],
                           totals: dict[str, int] | None = None) -> None:
        """How far `step` got; `totals`: how many records those partitions hold, if known."""
        await self.publish(self._event("step.offsets", step=step, offsets=dict(offsets),
                                       totals=dict(totals or {})))


async def start_producer(settings: Settings) -> Producer:
    """The flow's producer, once Kafka takes connections: a running batch waits a Kafka
    outage out (up to `DHUB_PUBLISH_DEADLINE_S`) rather than failing for it — its events are
    its only way to report, and the outage says nothing about the batch's data."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + settings.publish_deadline_s
    next_delay = RetryPolicy(initial_s=0.5, cap_s=5.0).delays()
    while True:
        try:
            producer: Producer = await open_producer(settings, tries=1)
            return producer
        except Exception as exc:
            delay = next_delay()
            if classify(exc) is Verdict.PERMANENT or loop.time() + delay > give_up:
                raise
            log.warning("kafka not reachable for the batch's events (%s), retry in %.1fs",
                        describe(exc), delay)
            await asyncio.sleep(delay)


@asynccontextmanager
async def open_publisher(settings: Settings, batch_id: str, pipeline_id: str,
                         **options: float) -> AsyncIterator[EventPublisher]:
    """A publisher on its own producer; leaving the block flushes and closes the producer."""
    producer = await start_producer(settings)
    options.setdefault("deadline_s", settings.publish_deadline_s)
    try:
        yield EventPublisher(producer, settings.topic_events, batch_id, pipeline_id, **options)
    except BaseException:
        # Also when cancelled (a flow run being torn down, where Prefect's anyio scopes
        # re-cancel every await): shielded, and bounded as the process is on its way out.
        with anyio.CancelScope(shield=True), anyio.move_on_after(STOP_TIMEOUT_S):
            await producer.stop()
        raise
    await producer.stop()
