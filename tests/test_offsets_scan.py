"""The offsets scanner (`core.offsets_scan`, C): a poll decoded with it applies and refuses
exactly what the decode without it does, for well-formed records, for each way a record can
be odd, and for records mutated at random; and it does take the records it was made for
(else it would be a cost for nothing)."""

from __future__ import annotations

import random
import time
from typing import Any, TypeAlias

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from consumers.plumbing.polls import DECODE_SLICE, Poll, decode
from core._offsets_scan import Scanner
from core.applier import script_entries
from core.codec import Event
from core.models import MAX_OFFSET
from core.offsets_scan import new_scan

Record: TypeAlias = ConsumerRecord[bytes, bytes]
TP = TopicPartition("events", 0)


def _record(offset: int, key: bytes | None, value: bytes | None) -> Record:
    return ConsumerRecord("events", 0, offset, 0, 0, key, value, None,
                          len(key or b""), len(value or b""), ())


def _offsets(batch: str = "b1", step: str = "load", **fields: Any) -> Event:
    fields.setdefault("offsets", {"p0": 5})
    return Event("step.offsets", batch, "pipe", step=step, **fields)


def _raw(**fields: Any) -> bytes:
    return _offsets(**fields).encode()


def _edit(raw: bytes, **changes: Any) -> bytes:
    """The record's JSON with fields set (None: removed), re-encoded compactly."""
    body = orjson.loads(raw)
    for name, value in changes.items():
        if value is None:
            body.pop(name, None)
        else:
            body[name] = value
    return orjson.dumps(body)


def _poll(values: list[bytes | None], keys: list[bytes | None] | None = None
          ) -> dict[TopicPartition, list[Record]]:
    keys = keys if keys is not None else [b"b1"] * len(values)
    return {TP: [_record(n, k, v) for n, (k, v) in enumerate(zip(keys, values, strict=True))]}


def _outcome(poll: Poll) -> tuple[Any, ...]:
    """What a poll does: its script entries per batch (the offsets and totals entries as
    sets: their order is free), the count applied, its dead letters and re-keyed records."""
    applied: dict[tuple[str, str], tuple[list[Any], set[Any]]] = {}
    for pipeline_id, batches in script_entries(poll.applied).items():
        for batch_id, entries in batches.items():
            ordered = [e for e in entries if e[0] not in ("o", "t")]
            merged = {(e[0], e[1], frozenset(zip(e[2::2], e[3::2], strict=True)))
                      for e in entries if e[0] in ("o", "t")}
            applied[(pipeline_id, batch_id)] = (ordered, merged)
    return (applied, poll.count, [(r.offset, reason) for r, reason in poll.bad],
            [(key, r.offset) for key, r in poll.rekey])


async def _both(records: dict[TopicPartition, list[Record]]) -> tuple[Poll, Poll]:
    decoded = await decode(records, epoch=0, scan=False)
    scanned = await decode(records, epoch=0, scan=True)
    assert _outcome(scanned) == _outcome(decoded)
    return decoded, scanned


def test_the_extension_is_built() -> None:
    # `make setup` builds it; without it the consumer decodes everything (a warning says so).
    assert new_scan(True) is not None
    assert new_scan(False) is None


async def test_well_formed_offsets_records_are_taken_and_merged() -> None:
    values: list[bytes | None] = [
        _raw(offsets={"p0": 5, "p1": 7}),
        _raw(offsets={"p0": 3}),  # older: the highest stays
        _raw(offsets={"p0": 9}, totals={"p0": 100}),
        _raw(offsets={"p1": 8}, totals={"p0": 90, "p1": 50}),  # the latest total wins
        _raw(step="extract", offsets={"p0": MAX_OFFSET}, ts=0.0),
        _raw(batch="b2", offsets={"p9": 1}),
    ]
    keys: list[bytes | None] = [b"b1", b"b1", b"b1", b"b1", b"b1", b"b2"]
    decoded, scanned = await _both(_poll(values, keys))
    assert scanned.taken == 6 and scanned.events == []
    assert {(e.batch_id, e.step): (e.offsets, e.totals) for e in scanned.merged} == {
        ("b1", "load"): ({"p0": 9, "p1": 8}, {"p0": 90, "p1": 50}),
        ("b1", "extract"): ({"p0": MAX_OFFSET}, {}),
        ("b2", "load"): ({"p9": 1}, {}),
    }
    assert decoded.count == scanned.count == 6


BASE = _raw(offsets={"p0": 5, "p1": 6})

# Records the scanner must leave to the decode: each is accepted or refused there, and the
# outcome must be that same one.
ODD: dict[str, bytes | None] = {
    "space after a colon": BASE.replace(b'":', b'": ', 1),
    "a newline at the end": BASE + b"\n",
    "escaped id character": BASE.replace(b'"b1"', b'"b\\u0031"'),
    "escaped quote": BASE.replace(b'"load"', b'"lo\\"ad"'),
    "unknown field": _edit(BASE, extra=1),
    "field twice": BASE[:-1] + b',"step":"extract"}',
    "partition twice": BASE.replace(b'"p1":6', b'"p0":2'),
    "no offsets": _edit(BASE, offsets={}),
    "offsets a list": _edit(BASE, offsets=[1]),
    "offset nested": _edit(BASE, offsets={"p0": {"x": 1}}),
    "offset negative": _edit(BASE, offsets={"p0": -1}),
    "offset minus zero": BASE.replace(b'"p0":5', b'"p0":-0'),
    "offset past the limit": _edit(BASE, offsets={"p0": MAX_OFFSET + 1}),
    "offset of 17 digits": _edit(BASE, offsets={"p0": 10**16}),
    "offset leading zero": BASE.replace(b'"p0":5', b'"p0":05'),
    "offset a float": BASE.replace(b'"p0":5', b'"p0":5.0'),
    "offset a string": _edit(BASE, offsets={"p0": "5"}),
    "ts negative": _edit(BASE, ts=-1.0),
    "ts minus zero": _edit(BASE, ts=-0.0),
    "ts a day and more ahead": _edit(BASE, ts=time.time() + 90_000),
    "ts a day and more ahead, exponent": _edit(BASE, ts=1e12),
    "ts a little less than a day ahead": _edit(BASE, ts=time.time() + 85_000),
    "ts just under one": _edit(BASE, ts=0.9999999999999999),
    "ts with an exponent": _edit(BASE, ts=1.7e9),
    "ts an integer": _edit(BASE, ts=1_700_000_000),
    "ts huge": BASE.replace(b'"ts":', b'"ts":1e400,"x":'),
    "ts a string": _edit(BASE, ts="1"),
    "ts missing": _edit(BASE, ts=None),
    "schema 2": _edit(BASE, schema=2),
    "schema 1.0": BASE.replace(b'"schema":1', b'"schema":1.0'),
    "schema a string": _edit(BASE, schema="1"),
    "another kind": _edit(BASE, type="step.state", state="running", offsets=None),
    "an unknown kind": _edit(BASE, type="step.offset"),
    "no type": _edit(BASE, type=None),
    "no event id": _edit(BASE, event_id=None),
    "empty batch id": _edit(BASE, batch_id=""),
    "id of 128": _edit(BASE, step="s" * 128),
    "id of 129": _edit(BASE, step="s" * 129),
    "id with a colon": _edit(BASE, pipeline_id="pi:pe"),
    "id with a space": _edit(BASE, step="lo ad"),
    "id not ASCII": _edit(BASE, step="l\u00f6ad"),
    "partition name odd": _edit(BASE, offsets={"p/0": 1}),
    "totals empty": _edit(BASE, totals={}),
    "totals odd": _edit(BASE, totals={"p0": -3}),
    "65 partitions": _edit(BASE, offsets={f"p{n}": n for n in range(65)}),
    "64 partitions": _edit(BASE, offsets={f"p{n}": n for n in range(64)}),
    "trailing bytes": BASE + b"x",
    "two objects": BASE + BASE,
    "cut short": BASE[:-3],
    "not an object": b"[1]",
    "not JSON": b"{nope",
    "empty": b"",
    "none": None,
}


@pytest.mark.parametrize("name", list(ODD))
async def test_an_odd_record_ends_as_the_decode_ends_it(name: str) -> None:
    values: list[bytes | None] = [_raw(offsets={"p0": 1}), ODD[name], _raw(offsets={"p1": 2})]
    _, scanned = await _both(_poll(values))
    assert scanned.taken >= 2  # the well-formed ones around it


@pytest.mark.parametrize("key", [None, b"", b"b2", b"b1 ", b"b1\x00"])
async def test_a_record_keyed_otherwise_is_left_for_rekeying(key: bytes | None) -> None:
    values: list[bytes | None] = [_raw(), _raw(), _raw()]
    _, scanned = await _both(_poll(values, [b"b1", key, b"b1"]))
    assert scanned.taken == 2
    assert [k for k, _ in scanned.rekey] == [b"b1"]


async def test_a_total_in_a_record_left_to_the_decode_keeps_its_place_in_order() -> None:
    # The merge puts the scanner's totals last; a later total of the same step in a record
    # it left (a space makes it so) must still win: such a poll is decoded whole.
    values: list[bytes | None] = [
        _raw(totals={"p0": 10}),
        _raw(totals={"p0": 20}).replace(b'":', b'": ', 1),
    ]
    decoded, scanned = await _both(_poll(values))
    assert scanned.taken == 0  # decoded whole
    [entries] = [e for e in script_entries(scanned.applied)["pipe"]["b1"] if e[0] == "t"]
    assert entries == ["t", "load", "p0", "20"]
    assert decoded.count == scanned.count == 2


async def test_totals_of_other_steps_need_no_whole_decode() -> None:
    values: list[bytes | None] = [
        _raw(totals={"p0": 10}),
        _raw(step="extract", totals={"p0": 20}).replace(b'":', b'": ', 1),
    ]
    _, scanned = await _both(_poll(values))
    assert scanned.taken == 1


def _mutate(rng: random.Random, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(data))
        what = rng.random()
        byte = rng.choice(b'{}[]":,.-+eE0123456789 \\abp_\x00\xc3')
        if what < 0.4:
            data[at] = byte
        elif what < 0.7:
            data.insert(at, byte)
        elif len(data) > 1:
            del data[at]
    return bytes(data)


async def test_records_mutated_at_random_end_as_the_decode_ends_them() -> None:
    rng = random.Random(20261204)
    bases = [_raw(offsets={"p0": 5, "p1": 6}), _raw(offsets={"p0": 7}, totals={"p0": 9}),
             _raw(step="extract", offsets={"p3": 0})]
    took = 0
    for _ in range(60):
        values: list[bytes | None] = []
        for _ in range(50):
            base = rng.choice(bases)
            values.append(_mutate(rng, base) if rng.random() < 0.6 else base)
        _, scanned = await _both(_poll(values))
        took += scanned.taken
    assert took > 0


async def test_a_poll_across_slices_merges_into_one_event_per_step() -> None:
    n = 2 * DECODE_SLICE + 10
    values: list[bytes | None] = [_raw(offsets={f"p{i % 4}": i}) for i in range(n)]
    _, scanned = await _both(_poll(values))
    assert scanned.taken == n
    [merged] = scanned.merged
    assert merged.offsets == {f"p{p}": max(i for i in range(n) if i % 4 == p) for p in range(4)}


def test_a_scanner_is_empty_after_its_drain() -> None:
    scanner = Scanner(MAX_OFFSET, bytes(16))
    limit = time.time() + 86_400
    assert scanner.feed([_raw(), b"{}"], [b"b1", b"b1"], limit) == [1]
    assert len(scanner.drain()) == 1
    assert scanner.drain() == []
    assert scanner.taken == 1


def test_the_hash_key_changes_nothing_but_where_entries_sit() -> None:
    # Each process hashes with a key of its own (a crafted set of ids must not pile into one
    # probe run); what a scan keeps, and its order, must not depend on it.
    values: list[bytes | None] = [
        _raw(batch=f"b{n % 50}", step=f"s{n % 3}", offsets={f"p{n % 70}": n},
             totals={f"p{n % 70}": 10_000 - n})
        for n in range(3_000)]
    keys: list[bytes | None] = [f"b{n % 50}".encode() for n in range(3_000)]
    drains = []
    for key in (bytes(16), b"\xff" * 16, b"0123456789abcdef"):
        scanner = Scanner(MAX_OFFSET, key)
        assert scanner.feed(values, keys, time.time() + 86_400) == []
        drains.append(scanner.drain())
    assert drains[0] == drains[1] == drains[2]
    assert len(drains[0]) == 150
