"""The Kafka message codec: round trips and the reasons malformed messages are refused."""

from __future__ import annotations

import orjson
import pytest

from core.codec import CodecError, Command, Event, decode_command, decode_event


def test_command_round_trip() -> None:
    command = Command("run", "batch-1", "pipe", pipeline_version="3")
    decoded = decode_command(command.encode())
    assert decoded == command


def test_event_round_trip_keeps_only_set_fields() -> None:
    event = Event("step.offsets", "batch-1", "pipe", step="extract", offsets={"partition_0": 5})
    raw = orjson.loads(event.encode())
    assert "state" not in raw and raw["offsets"] == {"partition_0": 5}
    assert decode_event(event.encode()) == event
    assert event.to_script() == {"id": event.event_id, "t": "step.offsets", "step": "extract",
                                 "offsets": {"partition_0": "5"}}


def _event(**changes: object) -> bytes:
    base: dict[str, object] = {"schema": 1, "type": "batch.state", "event_id": "e1",
                               "batch_id": "batch-1", "pipeline_id": "pipe", "ts": 1.0,
                               "state": "running"}
    base.update(changes)
    return orjson.dumps({k: v for k, v in base.items() if v is not None})


@pytest.mark.parametrize(("raw", "reason"), [
    (None, "empty"),
    (b"{oops", "not JSON"),
    (b"[1]", "not a JSON object"),
    (_event(schema=2), "schema"),
    (_event(type="batch.exploded"), "unknown event type"),
    (_event(batch_id="../etc"), "batch_id"),
    (_event(event_id=None), "event_id"),
    (_event(ts="yesterday"), "ts"),
    (_event(state="done"), "invalid batch state"),
    (_event(state="stop", outcome="exploded"), "invalid outcome"),
    (_event(type="step.state", step="extract", state="finished"), "invalid step state"),
    (_event(type="step.offsets", step="extract", offsets={}), "non-empty"),
    (_event(type="step.offsets", step="extract", offsets={"p": -1}), "invalid offset"),
    (_event(type="step.offsets", step="extract", offsets={"p": 1.5}), "invalid offset"),
    (_event(type="step.offsets", step="extract", offsets={"p": 2**53}), "invalid offset"),
    (_event(type="step.offsets", step="extract", offsets={"a b": 1}), "partition"),
])
def test_malformed_events_are_refused_with_a_reason(raw: bytes | None, reason: str) -> None:
    with pytest.raises(CodecError, match=reason):
        decode_event(raw)


def test_malformed_commands_are_refused() -> None:
    with pytest.raises(CodecError, match="unknown command type"):
        decode_command(orjson.dumps({"schema": 1, "type": "explode"}))
    good = orjson.loads(Command("stop", "batch-1", "pipe").encode())
    good["pipeline_version"] = 3
    with pytest.raises(CodecError, match="pipeline_version"):
        decode_command(orjson.dumps(good))


def test_deploy_commands_name_a_pipeline_version_not_a_batch() -> None:
    command = Command("deploy", "", "pipe", pipeline_version="2")
    assert command.key == b"pipe"
    assert decode_command(command.encode()) == command
    with pytest.raises(CodecError, match="pipeline_version"):
        decode_command(Command("deploy", "", "pipe").encode())
    with pytest.raises(CodecError, match="batch_id"):
        decode_command(Command("run", "", "pipe").encode())
