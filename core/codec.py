"""The Kafka message codec: commands and events as versioned JSON (orjson).

Every message carries `schema`, `type`, a unique `event_id`, `batch_id`, `pipeline_id` and `ts`.
Decoding validates strictly and raises `CodecError` with a reason fit for the dead-letter topic.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from core.models import BATCH_STATES, MAX_OFFSET, OUTCOMES, STEP_STATES, valid_id

SCHEMA: Final = 1
# `deploy` concerns a pipeline version, not a batch: its batch_id is empty, its key the pipeline.
COMMAND_TYPES: Final = frozenset({"run", "stop", "delete", "deploy"})
EVENT_TYPES: Final = frozenset({"batch.state", "step.state", "step.offsets"})
MAX_REASON: Final = 2000


class CodecError(ValueError):
    """A message that cannot be applied; its text is the dead-letter reason."""


@dataclass(slots=True)
class Command:
    type: str
    batch_id: str
    pipeline_id: str
    pipeline_version: str = ""
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    ts: float = field(default_factory=time.time)

    @property
    def key(self) -> bytes:
        """The Kafka key: one batch's (or one pipeline's) commands stay in order."""
        return (self.batch_id or self.pipeline_id).encode()

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "schema": SCHEMA,
                "type": self.type,
                "event_id": self.event_id,
                "batch_id": self.batch_id,
                "pipeline_id": self.pipeline_id,
                "pipeline_version": self.pipeline_version,
                "ts": self.ts,
            }
        )


@dataclass(slots=True)
class Event:
    """A change to apply to a batch: its state, one step's state, or one step's offsets."""

    type: str
    batch_id: str
    pipeline_id: str
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    ts: float = field(default_factory=time.time)
    state: str | None = None
    outcome: str | None = None
    reason: str | None = None
    flow_run_id: str | None = None
    step: str | None = None
    offsets: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema": SCHEMA,
            "type": self.type,
            "event_id": self.event_id,
            "batch_id": self.batch_id,
            "pipeline_id": self.pipeline_id,
            "ts": self.ts,
        }
        for name in ("state", "outcome", "reason", "flow_run_id", "step", "offsets"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def encode(self) -> bytes:
        return orjson.dumps(self.to_dict())

    def to_script(self) -> dict[str, Any]:
        """The compact form `APPLY_EVENTS` reads (offsets as strings: Lua numbers are doubles)."""
        out: dict[str, Any] = {"id": self.event_id, "t": self.type}
        if self.state is not None:
            out["state"] = self.state
        if self.outcome is not None:
            out["outcome"] = self.outcome
        if self.reason is not None:
            out["reason"] = self.reason
        if self.flow_run_id is not None:
            out["flow_run_id"] = self.flow_run_id
        if self.step is not None:
            out["step"] = self.step
        if self.offsets is not None:
            out["offsets"] = {p: str(n) for p, n in self.offsets.items()}
        return out


def _load(raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        raise CodecError("empty message")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CodecError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CodecError("not a JSON object")
    if data.get("schema") != SCHEMA:
        raise CodecError(f"unsupported schema {data.get('schema')!r}")
    return data


def _id(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not valid_id(value):
        raise CodecError(f"missing or invalid {name}")
    return value


def _opt_str(data: dict[str, Any], name: str, limit: int = 256) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise CodecError(f"invalid {name}")
    return value


def _ts(data: dict[str, Any]) -> float:
    ts = data.get("ts")
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        raise CodecError("missing or invalid ts")
    return float(ts)


def decode_command(raw: bytes | None) -> Command:
    data = _load(raw)
    kind = data.get("type")
    if kind not in COMMAND_TYPES:
        raise CodecError(f"unknown command type {kind!r}")
    version = data.get("pipeline_version", "")
    if not isinstance(version, str):
        raise CodecError("invalid pipeline_version")
    if kind == "deploy" and not valid_id(version):
        raise CodecError("deploy needs a pipeline_version")
    return Command(
        type=kind,
        batch_id="" if kind == "deploy" and data.get("batch_id") == "" else _id(data, "batch_id"),
        pipeline_id=_id(data, "pipeline_id"),
        pipeline_version=version,
        event_id=_id(data, "event_id"),
        ts=_ts(data),
    )


def decode_event(raw: bytes | None) -> Event:
    data = _load(raw)
    kind = data.get("type")
    if kind not in EVENT_TYPES:
        raise CodecError(f"unknown event type {kind!r}")
    event = Event(
        type=kind,
        batch_id=_id(data, "batch_id"),
        pipeline_id=_id(data, "pipeline_id"),
        event_id=_id(data, "event_id"),
        ts=_ts(data),
    )
    if kind == "batch.state":
        event.state = data.get("state")
        if event.state not in BATCH_STATES:
            raise CodecError(f"invalid batch state {event.state!r}")
        event.outcome = _opt_str(data, "outcome")
        if event.outcome is not None and event.outcome not in OUTCOMES:
            raise CodecError(f"invalid outcome {event.outcome!r}")
        event.reason = _opt_str(data, "reason", MAX_REASON)
        event.flow_run_id = _opt_str(data, "flow_run_id")
        return event
    event.step = _id(data, "step")
    if kind == "step.state":
        event.state = data.get("state")
        if event.state not in STEP_STATES:
            raise CodecError(f"invalid step state {event.state!r}")
        return event
    offsets = data.get("offsets")
    if not isinstance(offsets, dict) or not offsets:
        raise CodecError("offsets must be a non-empty object")
    for part, value in offsets.items():
        if not valid_id(part):
            raise CodecError(f"invalid partition name {part!r}")
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_OFFSET:
            raise CodecError(f"invalid offset for {part!r}")
    event.offsets = offsets
    return event
