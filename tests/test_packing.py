"""core.packing without Redis: a packed hash reads back exactly as the hash it packed."""

from __future__ import annotations

import random

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.layout import render
from core.packing import PACKED, PLAIN, VERSION, pack, unpacked

STEPS = ("extract", "transform", "load")
CONFIG = orjson.dumps({step: {"fail_at": None, "invalid_rate": 0.02, "partitions": 3,
                              "rows": 6001, "seed": 42, "throttle": None}
                       for step in STEPS}).decode()


def iso(ms: int) -> str:
    """`core.models.now_iso`'s form of a time `ms` milliseconds after 2026-12-02T00:00Z."""
    seconds, frac = divmod(1_796_169_600_000 + ms, 1000)
    from datetime import UTC, datetime
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:03d}Z"


def finished(rng: random.Random, partitions: int = 8) -> dict[str, str]:
    """A finished batch as APPLY_EVENTS leaves it: random totals, offsets at their totals,
    step times after its creation."""
    created = rng.randrange(10**8)
    fields = {
        "id": "batch-01m8vm3bpkpqxactj6sn396g69", "name": "sales-pipeline",
        "deployment": "run-pipeline/sales-pipeline", "pipeline_id": "pipeline-sales",
        "pipeline_version": "3", "state": "stop", "steps": orjson.dumps(STEPS).decode(),
        "created_at": iso(created), "updated_at": iso(created + 10**6), "rev": "41",
        "seq": "1234", "config": CONFIG, "flow_run_id": "b0db5be8-ec8d-4058-b444-7555748c1f63",
        "outcome": "completed", "reason": "Completed", "stop_ts": "1796223388.3981395",
    }
    at = created
    for step in STEPS:
        fields["step:" + step] = "success"
        at += rng.randrange(10**5)
        fields["started:" + step] = iso(at)
        at += rng.randrange(10**6)
        fields["moved:" + step] = iso(at)
        for p in range(partitions):
            total = str(rng.randrange(10**7))
            fields[f"tot:{step}:partition_{p}"] = fields[f"off:{step}:partition_{p}"] = total
    return fields


def test_a_finished_batch_packs_small_and_reads_back_whole() -> None:
    fields = finished(random.Random(1))
    packed = pack(fields)
    assert set(packed) == (set(fields) & PLAIN) | {PACKED}
    assert packed[PACKED].startswith(VERSION)
    assert len(packed[PACKED]) < 300  # 73 fields, ~2.4 KB of text
    assert unpacked(packed) == fields
    assert render(unpacked(packed)) == render(fields)


def test_an_unpacked_hash_is_read_as_it_is() -> None:
    fields = finished(random.Random(2))
    assert unpacked(fields) is fields


def test_a_field_written_beside_the_packed_ones_wins() -> None:
    packed = pack(finished(random.Random(3)))
    packed["reason"] = "abandoned"
    assert unpacked(packed)["reason"] == "abandoned"


def test_packing_a_packed_hash_or_reading_an_unknown_version_fails() -> None:
    packed = pack(finished(random.Random(4)))
    with pytest.raises(ValueError):
        pack(packed)
    with pytest.raises(ValueError):
        unpacked({**packed, PACKED: "z9:" + packed[PACKED][3:]})


@pytest.mark.parametrize("change", [
    {"steps": '[ "extract", "load"]'},                # steps JSON orjson would not write back
    {"steps": "not json"},
    {"config": '{"a": 1}'},                            # config orjson would not write back
    {"config": "null"},
    {"config": '"text"'},
    {"deployment": "elsewhere"},
    {"pipeline_id": "sales-pipeline"},                 # the same as the name
    {"off:extract:partition_0": "007"},                # not as Python writes an int
    {"off:extract:partition_1": "-3"},
    {"tot:load:partition_2": "12345678901234567890123"},  # past 64-bit integers
    {"off:load:partition_3": "5", "tot:load:partition_3": "x"},
    {"started:extract": "2026-12-02 10:00:00.000Z"},  # not now_iso's form
    {"moved:load": "2026-12-02T10:00:00.000+00:00"},
    {"resumed:transform": "1500"},
    {"resumed_from": "batch-01m8vm3bpkpqxactj6sn396g60"},
    {"off:unknown:partition_0": "5", "step:unknown": "running"},  # a step not in `steps`
    {"custom": "value", "seen_n": "3"},
])
def test_unusual_fields_read_back_exactly(change: dict[str, str]) -> None:
    fields = {**finished(random.Random(5)), **change}
    assert unpacked(pack(fields)) == fields


def test_a_batch_without_created_at_keeps_its_times_as_written() -> None:
    fields = finished(random.Random(6))
    del fields["created_at"]
    assert unpacked(pack(fields)) == fields


_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
_number = st.integers(min_value=-(10**20), max_value=10**20).map(str)
_time = st.integers(min_value=-(10**12), max_value=10**12).map(iso)


@st.composite
def hashes(draw: st.DrawFn) -> dict[str, str]:
    """Batch hashes of any shape: known and unknown steps and partitions, values in and out
    of each packed form, fields missing or extra."""
    steps = draw(st.lists(st.sampled_from(["a", "b", "c:d", "step"]), max_size=4))
    fields: dict[str, str] = {}
    if draw(st.booleans()):
        fields["steps"] = orjson.dumps(steps).decode() if draw(st.booleans()) else draw(_text)
    if draw(st.booleans()):
        fields["created_at"] = draw(_time)
    value = st.one_of(_number, _time, _text)
    for step in [*steps, "zz"]:
        for head in ("step", "started", "moved", "resumed"):
            if draw(st.booleans()):
                fields[f"{head}:{step}"] = draw(value)
        for part in draw(st.lists(st.sampled_from(["p0", "p1", "p:2", ""]), max_size=3)):
            for prefix in draw(st.sets(st.sampled_from(["off", "tot"]))):
                fields[f"{prefix}:{step}:{part}"] = draw(value)
    for name in ("name", "deployment", "pipeline_id", "config", "reason", "id", "state",
                 "rev", "deleted"):
        if draw(st.booleans()):
            fields[name] = draw(st.one_of(value, st.just("run-pipeline/x"), st.just("x"),
                                          st.just('{"a":[1,2]}')))
    fields.update(draw(st.dictionaries(_text.filter(lambda k: k != PACKED), value, max_size=3)))
    return fields


@settings(max_examples=400, deadline=None)
@given(hashes())
def test_any_hash_reads_back_exactly(fields: dict[str, str]) -> None:
    packed = pack(fields)
    assert all(isinstance(v, str) for v in packed.values())
    assert unpacked(packed) == fields


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=2**32), st.integers(min_value=1, max_value=16))
def test_realistic_batches_read_back_exactly(seed: int, partitions: int) -> None:
    fields = finished(random.Random(seed), partitions)
    assert unpacked(pack(fields)) == fields
