"""The API's Kafka sends of one loop turn are handed to the producer together and awaited under
one deadline (service/command_sender.py); each request still gets its own record's answer."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar, cast

import pytest
from aiohttp import web
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError, RequestTimedOutError

from core.codec import Command
from service.command_sender import Ambiguous, CommandSender, Refused
from service.request_log import CURRENT_REQUEST, REQUEST_ID, RequestContext


class DeadClient:
    async def fetch_all_metadata(self) -> None:  # the health probe: Kafka stays down
        raise KafkaConnectionError("down")


class StubProducer:
    """Answers each record as `outcome(n)` says: 'ok', 'hang' (never acknowledged),
    'refuse' (send raises), or an exception the delivery fails with."""

    client = DeadClient()

    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome
        self.sent: list[bytes] = []

    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future[object]:
        what = self.outcome(len(self.sent))
        if what == "refuse":
            raise KafkaConnectionError("refused")
        self.sent.append(key)
        delivery: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if what == "ok":
            delivery.set_result(None)
        elif isinstance(what, Exception):
            asyncio.get_running_loop().call_soon(delivery.set_exception, what)
        return delivery


def command(n: int) -> Command:
    return Command("run", f"batch-{n}", "p", pipeline_version="1")


def sender_of(producer: StubProducer, timeout: float = 5.0) -> CommandSender:
    return CommandSender(producer, "commands", "events", timeout=timeout)


async def outcomes(sender: CommandSender, count: int) -> list[Any]:
    return await asyncio.gather(*(sender.command(command(n)) for n in range(count)),
                                return_exceptions=True)


async def test_each_request_gets_its_own_records_answer() -> None:
    fates: list[Any] = ["ok", RequestTimedOutError(), MessageSizeTooLargeError(), "ok"]
    producer = StubProducer(lambda n: fates[n])
    got = await outcomes(sender_of(producer), 4)
    assert producer.sent == [b"batch-0", b"batch-1", b"batch-2", b"batch-3"]  # in call order
    assert got[0] is None and got[3] is None
    assert isinstance(got[1], Ambiguous)  # retriable: the broker may have written it
    assert isinstance(got[2], Refused) and not isinstance(got[2], Ambiguous)


async def test_a_turn_not_acknowledged_in_time_is_ambiguous_for_each_record() -> None:
    producer = StubProducer(lambda n: "ok" if n == 0 else "hang")
    started = asyncio.get_running_loop().time()
    got = await outcomes(sender_of(producer, timeout=0.2), 3)
    assert asyncio.get_running_loop().time() - started < 1.0  # one deadline for the turn
    assert got[0] is None
    assert all(isinstance(g, Ambiguous) for g in got[1:]), got


async def test_records_after_a_refused_one_are_refused_and_kafka_is_marked_down() -> None:
    producer = StubProducer(lambda n: "ok" if n == 0 else "refuse")
    sender = sender_of(producer)
    got = await outcomes(sender, 3)
    assert got[0] is None
    assert all(type(g) is Refused for g in got[1:]), got
    assert producer.sent == [b"batch-0"]
    assert not sender.available  # the next request is refused at once
    with pytest.raises(Refused):
        await sender.command(command(9))
    await sender.close()


async def test_a_request_cancelled_before_its_turn_is_sent_queues_nothing() -> None:
    producer = StubProducer(lambda n: "ok")
    sender = sender_of(producer)
    tasks = [asyncio.create_task(sender.command(command(n))) for n in range(3)]
    await asyncio.sleep(0)  # each task has queued its record; the turn is not sent yet
    tasks[1].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], asyncio.CancelledError)
    assert producer.sent == [b"batch-0", b"batch-2"]


async def test_work_shared_by_requests_logs_under_none_of_them(
        caplog: pytest.LogCaptureFixture) -> None:
    """A send turn carries the records of every request of a loop turn, and Kafka's watcher
    outlives the request that found it down; both were tasks made from the first request's
    context, so their lines ("kafka unreachable ...", "kafka reachable again") carried that
    request's id, pipeline and batch, as if that request alone were concerned."""
    token = CURRENT_REQUEST.set(cast(web.Request, _Request({REQUEST_ID: "req-first"})))
    caplog.handler.addFilter(RequestContext())
    try:
        sender = sender_of(StubProducer(lambda n: "refuse"))
        await outcomes(sender, 2)
        await sender.close()
    finally:
        CURRENT_REQUEST.reset(token)
    lines = [r for r in caplog.records if r.name == "service.command_sender"]
    assert lines, "nothing logged"
    assert [getattr(r, "request_id", None) for r in lines] == [None] * len(lines)


class _Request(dict[Any, Any]):
    """What RequestContext reads of a request: its id and its route's match."""

    match_info: ClassVar[dict[str, str]] = {"pipeline_id": "p", "batch_id": "batch-0"}
