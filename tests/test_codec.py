"""The Kafka message codec: one class per kind, round trips, and the reasons malformed
messages are refused (each reason names the field at fault: it becomes a dead-letter reason)."""

from __future__ import annotations

import re
import time

import orjson
import pytest

from core.applier import script_entries
from core.codec import (
    BatchState,
    CodecError,
    Command,
    Deploy,
    Event,
    Run,
    StepOffsets,
    StepState,
    Stop,
    decode_command,
    decode_event,
    decode_events,
    derived_id,
)


def test_command_round_trip() -> None:
    command = Command("run", "batch-1", "pipe", pipeline_version="3")
    assert type(command) is Run and command.type == "run"
    decoded = decode_command(command.encode())
    assert decoded == command and type(decoded) is Run
    assert orjson.loads(command.encode())["pipeline_version"] == "3"
    assert command.to_dict()["type"] == "run"


def test_each_kind_decodes_to_its_own_class() -> None:
    kinds: dict[type[Event], Event] = {
        BatchState: Event("batch.state", "b", "p", state="stop", outcome="failed", reason="x"),
        StepState: Event("step.state", "b", "p", step="load", state="running"),
        StepOffsets: Event("step.offsets", "b", "p", step="load", offsets={"p0": 1}),
    }
    for cls, event in kinds.items():
        decoded = decode_event(event.encode())
        assert type(event) is cls and type(decoded) is cls and decoded == event
        assert isinstance(decoded, Event)
    assert type(decode_command(Command("stop", "b", "p").encode())) is Stop


def test_event_round_trip_keeps_only_set_fields() -> None:
    event = Event("step.offsets", "batch-1", "pipe", step="extract", offsets={"partition_0": 5})
    raw = orjson.loads(event.encode())
    assert "state" not in raw and raw["offsets"] == {"partition_0": 5} and raw["schema"] == 1
    assert decode_event(event.encode()) == event
    assert event.to_script() == ["o", "extract", "partition_0", "5"]
    # Fields of other kinds read None, so code handling every kind needs no isinstance.
    assert (event.state, event.outcome, event.reason, event.flow_run_id) == (None,) * 4
    state = Event(type="batch.state", batch_id="b", pipeline_id="p", state="running",
                  outcome=None, reason=None, flow_run_id="run-1")
    assert "outcome" not in orjson.loads(state.encode())
    assert (state.step, state.offsets) == (None, None)
    assert state.to_dict() == {"schema": 1, "type": "batch.state", "event_id": state.event_id,
                               "batch_id": "b", "pipeline_id": "p", "ts": state.ts,
                               "state": "running", "flow_run_id": "run-1"}


def test_events_stay_mutable_for_the_callers_that_amend_them() -> None:
    event = Event("batch.state", "b", "p", state="stop", outcome="failed")
    event.ts, event.reason, event.event_id = 5.0, "why", "e2"
    assert decode_event(event.encode()).reason == "why"
    step = Event("step.state", "b", "p", step="s", state="running")
    with pytest.raises(AttributeError, match=r"step\.state event has no reason"):
        step.reason = "no"
    with pytest.raises(TypeError, match="offsets"):
        Event("step.state", "b", "p", step="s", state="running", offsets={"a": 1})
    with pytest.raises(CodecError, match="unknown event type"):
        Event("batch.exploded", "b", "p")


@pytest.mark.parametrize(("fields", "reason"), [
    ({"batch_id": "b/1"}, "invalid batch_id 'b/1'"),
    ({"step": "s 1"}, "invalid step 's 1'"),
    ({"offsets": {"p:0": 1}}, "invalid partition name 'p:0'"),
    ({"totals": {"p\n": 1}}, "invalid partition name"),
    ({"ts": time.time() + 2 * 86_400}, "ahead of now"),
])
def test_an_event_built_in_code_is_checked_as_a_decoded_one(fields: dict[str, object],
                                                            reason: str) -> None:
    """A publisher (a step, the bridge) builds its events with `Event(...)`: what the codec
    would refuse is refused there too, before it reaches the topic."""
    given: dict[str, object] = {"batch_id": "b", "step": "s", "offsets": {"p": 1}} | fields
    batch_id = given.pop("batch_id")
    with pytest.raises(CodecError, match=reason):
        Event("step.offsets", batch_id, "p", **given)  # type: ignore[arg-type]


def test_decoded_offsets_merge_into_one_script_entry() -> None:
    raw = [Event("step.offsets", "b", "p", step="s", offsets={"a": n, "b": 10 - n}).encode()
           for n in range(5)]
    events = [decode_event(r) for r in raw]
    assert all(type(e) is StepOffsets for e in events)
    assert script_entries(events) == {"p": {"b": [["o", "s", "a", "4", "b", "10"]]}}


def _event(**changes: object) -> bytes:
    base: dict[str, object] = {"schema": 1, "type": "batch.state", "event_id": "e1",
                               "batch_id": "batch-1", "pipeline_id": "pipe", "ts": 1.0,
                               "state": "running"}
    base.update(changes)
    return orjson.dumps({k: v for k, v in base.items() if v is not None})


# Today's time in milliseconds (read as seconds: far ahead), and a time well over a day ahead.
MS_NOW = 1_796_000_000_000.0
YEAR_2100 = 4_102_444_800.0
MALFORMED_EVENTS = [
    (_event(schema=2), r"`\$.schema`"),
    (_event(schema=True), r"got `bool` - at `\$.schema`"),
    (_event(schema=None), "missing required field `schema`"),
    (_event(type="batch.exploded"), r"'batch.exploded' - at `\$.type`"),
    (_event(batch_id="../etc"), "invalid batch_id '../etc'"),
    (_event(batch_id="batch-1\n"), r"invalid batch_id 'batch-1\\n'"),
    (_event(event_id="é"), "invalid event_id"),
    (_event(batch_id=""), r"length >= 1 - at `\$.batch_id`"),
    (_event(pipeline_id="x" * 129), r"`\$.pipeline_id`"),
    (_event(event_id=None), "missing required field `event_id`"),
    (_event(ts="yesterday"), r"`\$.ts`"),
    (_event(ts=True), r"got `bool` - at `\$.ts`"),
    (_event(state="done"), r"'done' - at `\$.state`"),
    (_event(state="stop", outcome="exploded"), r"`\$.outcome`"),
    # A stop without its outcome read `completed`; an outcome elsewhere was dropped unsaid.
    (_event(state="stop"), "a batch.state stop carries its outcome: one of completed, "),
    (_event(state="stop").replace(b"}", b',"outcome":null}'), "carries its outcome"),
    (_event(state="running", outcome="failed"), "outcome and reason belong to a stop, not "
                                                "to 'running'"),
    (_event(state="scheduled", reason="why"), "belong to a stop, not to 'scheduled'"),
    (_event(state="stop", outcome="failed", reason="x" * 2001), r"`\$.reason`"),
    (_event(flow_run_id="x" * 257), r"`\$.flow_run_id`"),
    # Not a UUID: every Prefect call made with it failed (a reconciler round, a stop).
    (_event(flow_run_id="run-42"), r"`\$.flow_run_id`"),
    (_event(flow_run_id="0b5c3a8e-6f1d-4c2a-9e57-3d1f2a4b5c6"), r"`\$.flow_run_id`"),
    # Milliseconds for seconds: a stop so stamped would outrank every real end for ever.
    # (Fixed times, not taken from the clock: they are in the tests' ids, which must be the
    # same in each of `pytest -n`'s processes.)
    (_event(state="stop", outcome="cancelled", ts=MS_NOW), "ahead of now"),
    (_event(type="step.state", step="extract", state="running", ts=MS_NOW), "ahead of now"),
    (_event(type="step.offsets", step="extract", offsets={"p": 1}, ts=MS_NOW * 1000),
     "ahead of now"),
    (_event(ts=-1.0), r">= 0.0 - at `\$.ts`"),
    (_event(type="step.state", state="running"), "missing required field `step`"),
    (_event(type="step.state", step="extract", state="finished"), r"`\$.state`"),
    (_event(type="step.offsets", step="extract", offsets={}), r"`\$.offsets`"),
    (_event(type="step.offsets", step="extract", offsets={"p": -1}), r"`\$.offsets\[...\]`"),
    (_event(type="step.offsets", step="extract", offsets={"p": 1.5}), r"`\$.offsets\[...\]`"),
    (_event(type="step.offsets", step="extract", offsets={"p": True}), "got `bool`"),
    (_event(type="step.offsets", step="extract", offsets={"p": 2**53}), "<= 9007199254740991"),
    (_event(type="step.offsets", step="extract", offsets={"a b": 1}), "invalid partition name 'a b'"),
    (_event(type="step.offsets", step="extract", offsets={"": 1}), r"at `key` in `\$.offsets`"),
    (_event(type="step.state", step="ex/tract", state="running"), "invalid step 'ex/tract'"),
    (b'{"schema": 1, "type": "step.offsets", "event_id": "e", "batch_id": "b", '
     b'"pipeline_id": "p", "ts": 1, "step": "s", "offsets": {"p": 18446744073709551616}}',
     r"`\$.offsets\[...\]`"),
]


@pytest.mark.parametrize(("raw", "reason"), [
    (None, "empty"),
    (b"", "empty"),
    (b"{oops", "not JSON"),
    (b"[1]", "invalid event: Expected `object`, got `array`"),
    *MALFORMED_EVENTS,
])
def test_malformed_events_are_refused_with_a_reason(raw: bytes | None, reason: str) -> None:
    with pytest.raises(CodecError, match=reason):
        decode_event(raw)


# Valid records of each kind, and one with a partition's total (also an id).
GOOD_EVENTS = [
    _event(),
    _event(type="step.state", step="extract", state="running"),
    _event(type="step.offsets", step="extract", offsets={"p-0": 5}, totals={"p-0": 9}),
    _event(state="stop", outcome="failed", reason="no space left"),
]
REFUSALS = [(None, "empty"), (b"", "empty"), (b"{oops", "not JSON"), *MALFORMED_EVENTS,
            (_event(type="step.offsets", step="extract", offsets={"p": 1}, totals={"p q": 1}),
             "invalid partition name 'p q'")]


@pytest.mark.parametrize(("raw", "reason"), REFUSALS)
def test_a_poll_decoded_at_once_refuses_exactly_its_malformed_record(raw: bytes | None,
                                                                     reason: str) -> None:
    """`decode_events` checks the ids and times of all records in one pass: one bad record
    among good ones must be refused with its own reason, the others decoded as alone."""
    raws = [*GOOD_EVENTS[:2], raw, *GOOD_EVENTS[2:], raw]
    decoded = decode_events(raws)
    assert len(decoded) == len(raws)
    for got, one in zip(decoded, raws, strict=True):
        if one is raw:
            assert isinstance(got, CodecError)
            with pytest.raises(CodecError) as alone:
                decode_event(one)
            assert str(got) == str(alone.value)
            assert re.search(reason, str(got))
        else:
            assert got == decode_event(one)


def test_a_poll_of_good_records_decodes_as_each_alone() -> None:
    assert decode_events(GOOD_EVENTS) == [decode_event(raw) for raw in GOOD_EVENTS]
    assert decode_events([]) == []


# 2 KB of JSON nested 1,000 deep: msgspec recurses per level (even through a field it
# skips) and raises RecursionError, the bytes' fault like any other.
TOO_DEEP = b'{"x":' + b"[" * 1000 + b"]" * 1000 + b"}"


def test_json_nested_too_deep_is_refused_with_a_reason() -> None:
    with pytest.raises(CodecError, match="invalid event: nested too deep"):
        decode_event(TOO_DEEP)
    with pytest.raises(CodecError, match="invalid command: nested too deep"):
        decode_command(TOO_DEEP)
    # Inside a field a command does read: a publisher's run config (any JSON value).
    run = orjson.loads(Command("run", "batch-1", "pipe", "1").encode())
    run["create"] = {"config": {"extract": {"deep": orjson.Fragment(b"[" * 1000 + b"]" * 1000)}}}
    with pytest.raises(CodecError, match="invalid command: nested too deep"):
        decode_command(orjson.dumps(run))


def test_malformed_commands_are_refused() -> None:
    with pytest.raises(CodecError, match=r"invalid command: .*'explode' - at `\$.type`"):
        decode_command(orjson.dumps({"schema": 1, "type": "explode"}))
    good = orjson.loads(Command("stop", "batch-1", "pipe").encode())
    good["pipeline_version"] = 3
    with pytest.raises(CodecError, match="pipeline_version"):
        decode_command(orjson.dumps(good))
    good["pipeline_version"] = "../2"
    with pytest.raises(CodecError, match="pipeline_version"):
        decode_command(orjson.dumps(good))
    with pytest.raises(CodecError, match="unknown command type"):
        Command("explode", "b", "p")


def test_deploy_commands_name_a_pipeline_version_not_a_batch() -> None:
    command = Command("deploy", "", "pipe", pipeline_version="2")
    assert type(command) is Deploy and command.key == b"pipe"
    assert Command("run", "b", "pipe").key == b"b"
    assert decode_command(command.encode()) == command
    with pytest.raises(CodecError, match="pipeline_version"):
        decode_command(Command("deploy", "", "pipe").encode())
    with pytest.raises(CodecError, match="batch_id"):
        decode_command(Command("run", "", "pipe").encode())


def test_a_time_within_a_day_ahead_is_taken_as_clocks_differ() -> None:
    for ts in (0.0, time.time() + 3600, time.time() + 86_000):
        assert decode_event(_event(state="stop", outcome="completed", ts=ts)).ts == ts
    run = "0B5C3A8E-6F1D-4C2A-9E57-3D1F2A4B5C6D"
    assert decode_event(_event(flow_run_id=run)).flow_run_id == run


@pytest.mark.parametrize("ahead", [2 * 86_400.0, YEAR_2100], ids=["two-days", "year-2100"])
def test_a_time_more_than_a_day_ahead_from_a_clock_is_taken_as_a_guess(ahead: float) -> None:
    """A worker whose clock is off stamps its run's own events (its steps' states and
    offsets) ahead: refused, its steps' offsets were lost for good. Decoded alone or in a
    poll, such an event keeps everything but its time, which reads 0 (a guess any real
    time beats, as the bridge's for the same run's Prefect states)."""
    ts = ahead if ahead == YEAR_2100 else time.time() + ahead
    raws = [_event(type="step.offsets", step="extract", offsets={"p": 7}, ts=ts),
            _event(type="step.state", step="extract", state="success", ts=ts),
            _event(state="stop", outcome="completed", ts=ts)]
    decoded = [decode_event(raw) for raw in raws]
    polled = decode_events([*raws, _event(event_id="e2", ts=5.0)])
    for event in [*decoded, *polled[:3]]:
        assert isinstance(event, Event) and event.ts == 0.0, event
    assert decoded[0].offsets == {"p": 7} and decoded[1].state == "success"
    assert decoded[2].outcome == "completed"
    assert isinstance(polled[3], Event) and polled[3].ts == 5.0  # its neighbours' untouched


def test_derived_event_ids_stay_ids_of_at_most_128_characters() -> None:
    long_batch = "batch-" + "x" * 122
    for base in ("batch-1", long_batch, "y" * 128):
        event_id = derived_id("stop-", base)
        assert len(event_id) <= 128 and event_id.startswith("stop-")
        assert event_id == derived_id("stop-", base)  # a repeat names it the same
    assert derived_id("stop-", "batch-1") == "stop-batch-1"
    assert derived_id("stop-", long_batch) != derived_id("stop-", long_batch[:-1] + "z")
    decode_event(Event("batch.state", long_batch, "p", event_id=derived_id("stop-", long_batch),
                       state="stop", outcome="cancelled").encode())
