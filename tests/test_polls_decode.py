"""The events consumer's decode of a poll (`consumers.plumbing.polls.decode`): what it makes
of the records, and that a big poll does not hold the event loop from start to end. The
lists of decoded events are those of the decode without the offsets scanner, which takes
the offsets records it can read and merges them (tests/test_offsets_scan.py shows it
changes nothing of what a poll applies); what both must agree on is checked with both."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from consumers.plumbing.polls import DECODE_SLICE, decode
from core.codec import Event


def _record(offset: int, key: bytes | None, value: bytes) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("events", 0, offset, 0, 0, key, value, None,
                          len(key or b""), len(value), ())


def _poll(n: int, partitions: int = 1
          ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
    poll: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
    for i in range(n):
        event = Event("step.offsets", f"batch-{i % 7}", "pipe", step="load",
                      offsets={"p0": i})
        tp = TopicPartition("events", i % partitions)
        poll.setdefault(tp, []).append(_record(i, event.batch_id.encode(), event.encode()))
    return poll


async def test_a_poll_is_decoded_into_its_events_bad_records_and_rekeys() -> None:
    poll = _poll(3)
    records = poll[TopicPartition("events", 0)]
    good = records[0]
    records += [
        _record(3, good.key, good.value),  # the same event again: applied again, harmlessly
        _record(4, b"k", b"{not json"),
        _record(5, b"batch-other", records[1].value),  # keyed other than by its batch
        _record(6, b"k", b"{not json"),  # each malformed record is dead-lettered
    ]
    decoded = await decode(poll, epoch=4, scan=False)
    assert [e.offsets for e in decoded.events] == [{"p0": 0}, {"p0": 1}, {"p0": 2}, {"p0": 0}]
    assert [(r.offset, reason[:8]) for r, reason in decoded.bad] == [(4, "not JSON"),
                                                                      (6, "not JSON")]
    assert [(key, r.offset) for key, r in decoded.rekey] == [(b"batch-1", 5)]
    assert decoded.epoch == 4


@pytest.mark.parametrize("scan", [False, True], ids=["decoded", "scanned"])
async def test_one_bad_id_refuses_only_its_own_record(scan: bool) -> None:
    # A poll's ids are checked in one pass (core.codec.decode_events): the record at fault
    # must still be the only one refused, wherever it sits in the poll.
    poll = _poll(2 * DECODE_SLICE + 5)
    records = poll[TopicPartition("events", 0)]
    bad = Event("step.offsets", "batch-3", "pipe", step="load", offsets={"p0": 1}).to_dict()
    bad["offsets"] = {"p 0": 1}
    raw = orjson.dumps(bad)
    records[DECODE_SLICE + 3] = _record(DECODE_SLICE + 3, b"batch-3", raw)
    decoded = await decode(poll, epoch=0, scan=scan)
    assert [(r.offset, reason) for r, reason in decoded.bad] == [
        (DECODE_SLICE + 3, "invalid event: invalid partition name 'p 0': ids are "
                           "[A-Za-z0-9._-]{1,128}")]
    assert decoded.count == 2 * DECODE_SLICE + 4


@pytest.mark.parametrize("scan", [False, True], ids=["decoded", "scanned"])
async def test_a_record_keyed_other_than_its_batch_is_set_aside_for_rekeying(scan: bool) -> None:
    event = Event("step.offsets", "batch-1", "pipe", step="load", offsets={"p0": 1})
    poll = {TopicPartition("events", 0): [_record(0, b"batch-2", event.encode())]}
    decoded = await decode(poll, epoch=0, scan=scan)
    assert decoded.applied == []
    assert decoded.count == 0
    assert [(key, r.offset) for key, r in decoded.rekey] == [(b"batch-1", 0)]


@pytest.mark.parametrize("scan", [False, True], ids=["decoded", "scanned"])
@pytest.mark.parametrize("key", [None, b"", b"batch-1\nbatch-2", b"batch-1 ", "bätch".encode()])
async def test_a_slice_with_one_record_keyed_otherwise_sets_aside_only_that_one(
        key: bytes | None, scan: bool) -> None:
    # One odd key among good ones: only its record is set aside, whatever the key is (none
    # at all, empty, two ids, a near miss, not ASCII).
    poll = _poll(5)
    records = poll[TopicPartition("events", 0)]
    odd = records[1]
    records[1] = _record(1, key, odd.value)
    decoded = await decode(poll, epoch=0, scan=scan)
    # batch-n holds offset n (_poll): batch-1's record alone is not among them
    assert sorted((e.batch_id, (e.offsets or {})["p0"]) for e in decoded.applied) == [
        (f"batch-{n}", n) for n in (0, 2, 3, 4)]
    assert [(k, r.offset) for k, r in decoded.rekey] == [(b"batch-1", 1)]


@pytest.mark.parametrize("scan", [False, True], ids=["decoded", "scanned"])
@pytest.mark.parametrize("partitions", [1, 6], ids=["one partition", "six smaller than a slice"])
async def test_a_big_poll_lets_other_tasks_run_while_it_is_decoded(partitions: int,
                                                                    scan: bool) -> None:
    # The previous poll's scripts must reach Redis and the next fetch be read meanwhile: a
    # decode that never yields kept them waiting for the whole poll (~100 ms here).
    order: list[str] = []

    async def other() -> None:
        order.append("other task")

    task = asyncio.create_task(other())
    decoded = await decode(_poll(3 * DECODE_SLICE, partitions), epoch=0, scan=scan)
    order.append("decoded")
    await task
    assert decoded.count == 3 * DECODE_SLICE
    assert order == ["other task", "decoded"]
