"""Producing commands and events to Kafka from the API, answering 503 when Kafka cannot take them.

Two ways a send fails, and the caller must tell them apart:

- `Refused`: the record was certainly not written (Kafka known to be down, no metadata, the
  producer refused it, or the broker rejected it). Undoing what went before is safe.
- `Ambiguous`: the record was handed to the producer and no answer came in time (or a
  retriable error came): the broker may have written it, and the producer may still deliver
  it later. Whoever sent it must make its effect harmless rather than assume either way.

Kafka's health is tracked: a send that met an unreachable Kafka marks it down, and while it
is down every send is refused at once (no 5 s wait per request) until a background probe
(a metadata fetch through the producer's own client, plus a connection to the commands
topic's partition leaders) says it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.cluster import ClusterMetadata
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

from core.codec import Command, Event
from core.retry import Verdict, classify, describe
from service.errors import ApiError
from service.request_log import detached

log = logging.getLogger(__name__)
UNAVAILABLE_MESSAGE = "the command queue is unavailable; retry later"


class Refused(ApiError):
    """503: the record was not written."""

    def __init__(self) -> None:
        super().__init__(503, "unavailable", UNAVAILABLE_MESSAGE)


class Ambiguous(ApiError):
    """503: the record may or may not have been written."""

    def __init__(self, cause: str) -> None:
        super().__init__(503, "unavailable", UNAVAILABLE_MESSAGE)
        self.cause = cause


def _ambiguous_error(exc: BaseException) -> bool:
    """An error from the delivery future after the record was queued in the producer. A
    retriable error or a timeout may follow an attempt the broker did write; any other
    broker error (too large, not authorised...) is a definite rejection."""
    return isinstance(exc, KafkaTimeoutError | KafkaConnectionError) or bool(
        getattr(exc, "retriable", False))


# topic, key, value, and the future its sender awaits
_Record = tuple[str, bytes, bytes, "asyncio.Future[None]"]


def _leaders(cluster: ClusterMetadata, topic: str) -> set[int | None]:
    partitions = cluster.partitions_for_topic(topic) or set()
    return {cluster.leader_for_partition(TopicPartition(topic, p)) for p in partitions}


def _led(cluster: ClusterMetadata, topic: str) -> bool:
    """The topic exists and every partition has a leader."""
    leaders = _leaders(cluster, topic)
    return bool(leaders) and None not in leaders and -1 not in leaders


def _retrieve(future: asyncio.Future[object]) -> None:
    # A delivery we stopped waiting for may still fail later; that is already handled.
    if not future.cancelled():
        future.exception()


class CommandSender:
    def __init__(self, producer: AIOKafkaProducer, commands_topic: str, events_topic: str,
                 timeout: float = 5.0, probe_interval: float = 0.5,
                 probe_timeout: float = 1.0) -> None:
        self._producer = producer
        self._commands_topic = commands_topic
        self._events_topic = events_topic
        # Below a client's usual 10 s timeout, far above a healthy broker's acknowledgement.
        self._timeout = timeout
        self._probe_interval = probe_interval
        self._probe_timeout = probe_timeout
        self.available = True
        self.down_since: float | None = None
        self._watcher: asyncio.Task[None] | None = None
        # This loop turn's records, sent together once its callbacks have run.
        self._queued: list[_Record] = []
        self._turns: set[asyncio.Task[None]] = set()

    # -- health --------------------------------------------------------------------------

    def check(self) -> None:
        """Raises `Refused` at once while Kafka is known to be unreachable."""
        if not self.available:
            raise Refused()

    def _mark_down(self, exc: BaseException) -> None:
        if classify(exc) is not Verdict.UNAVAILABLE:
            return
        if self.available:
            log.warning("kafka unreachable (%s): refusing writes until it answers again",
                        describe(exc))
            self.available = False
            self.down_since = time.monotonic()
        if self._watcher is None or self._watcher.done():
            self._watcher = detached(self._watch(), "kafka watcher")

    async def _watch(self) -> None:
        while True:
            if await self.probe():
                break
            await asyncio.sleep(self._probe_interval)
        down_for = time.monotonic() - (self.down_since or time.monotonic())
        log.info("kafka reachable again after %.1fs", down_for)
        self.available = True
        self.down_since = None

    async def probe(self) -> bool:
        """Kafka answers metadata and the commands topic's leaders accept a connection."""
        return (await self.probe_topics([]))[self._commands_topic]

    async def probe_topics(self, others: list[str]) -> dict[str, bool]:
        """`probe()` for the commands topic, and for each of `others` whether it exists with
        a leader for every partition, from the same metadata (no connection of their own:
        their leaders' answers must not hold up or fail the commands topic's). All False
        when Kafka does not answer."""
        client = self._producer.client
        out = dict.fromkeys([self._commands_topic, *others], False)
        try:
            async with asyncio.timeout(self._probe_timeout):
                cluster = await client.fetch_all_metadata()
                for topic in out:
                    out[topic] = _led(cluster, topic)
                if out[self._commands_topic]:
                    for node in _leaders(cluster, self._commands_topic):
                        if not await client.ready(node):
                            out[self._commands_topic] = False
                            break
        except Exception:
            return dict.fromkeys(out, False)
        return out

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    # -- sending -------------------------------------------------------------------------

    async def _send(self, topic: str, key: bytes, value: bytes) -> None:
        """Returns once the broker acknowledged the record (acks=all); `Refused` or
        `Ambiguous` (both 503) otherwise. The records of one loop turn are handed to the
        producer together and awaited under one deadline (`_send_turn`): a deadline and a
        shielded wait per record cost as much CPU as the producer's own work for it."""
        self.check()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        if not self._queued:
            loop.call_soon(self._flush)
        self._queued.append((topic, key, value, waiter))
        # Cancelled before the turn is sent, the record is skipped: nothing is queued.
        await waiter

    def _flush(self) -> None:
        records, self._queued = self._queued, []
        task = detached(self._send_turn(records))
        self._turns.add(task)
        task.add_done_callback(self._turns.discard)

    async def _send_turn(self, records: list[_Record]) -> None:
        deliveries: list[asyncio.Future[object] | None] = [None] * len(records)
        failure: BaseException | None = None
        try:
            async with asyncio.timeout(self._timeout):
                for n, (topic, key, value, waiter) in enumerate(records):
                    if not waiter.done():  # else its request went away: nothing to queue
                        # Cancelling this call leaves nothing queued: the record is not written.
                        deliveries[n] = await self._producer.send(topic, value=value, key=key)
                handed = [d for d in deliveries if d is not None]
                if handed:
                    # Never cancels nor raises: the producer keeps the records either way.
                    await asyncio.wait(handed)
        except (KafkaError, TimeoutError) as exc:
            failure = exc
            self._mark_down(exc)
        except Exception as exc:
            failure = exc
        finally:
            # Cancelled (shutdown) leaves `failure` None: the records not acknowledged are
            # answered as for a timeout.
            for (topic, _, _, waiter), delivery in zip(records, deliveries, strict=True):
                self._answer(topic, waiter, delivery, failure)

    def _answer(self, topic: str, waiter: asyncio.Future[None],
                delivery: asyncio.Future[object] | None, failure: BaseException | None) -> None:
        """Settles one request's wait from its record's fate."""
        if delivery is not None:
            if delivery.done():
                _retrieve(delivery)  # read below, or its request went away
            else:
                # No longer awaited (timed out or cancelled): its outcome is answered below.
                delivery.add_done_callback(_retrieve)
        if waiter.done():
            return  # its request went away
        cause = describe(failure) if failure is not None else "CancelledError"
        if delivery is None:
            if failure is not None and not isinstance(failure, KafkaError | TimeoutError):
                waiter.set_exception(failure)
                return
            log.warning("kafka refused a record for %s: %s", topic, cause)
            waiter.set_exception(Refused())
        elif not delivery.done() or delivery.cancelled():
            log.warning("kafka did not confirm a record for %s: %s", topic, cause)
            waiter.set_exception(Ambiguous(cause))
        elif (exc := delivery.exception()) is None:
            waiter.set_result(None)
        else:
            self._mark_down(exc)
            if _ambiguous_error(exc):
                log.warning("kafka did not confirm a record for %s: %s", topic, describe(exc))
                waiter.set_exception(Ambiguous(describe(exc)))
            else:
                log.warning("kafka rejected a record for %s: %s", topic, describe(exc))
                waiter.set_exception(Refused())

    async def command(self, command: Command) -> None:
        await self._send(self._commands_topic, command.key, command.encode())

    async def events(self, events: list[Event]) -> None:
        for event in events:
            await self._send(self._events_topic, event.batch_id.encode(), event.encode())
