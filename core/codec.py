"""The Kafka message codec: bytes to the typed classes of `core.messages` and back.

`decode_event` and `decode_command` parse and validate (one msgspec call, then what msgspec
cannot check: `core.messages.check_event`) and raise `CodecError` with the reason (what and
where) for the dead-letter topic; `decode_events` does a poll's records at once. Whatever the
bytes: a payload nested deeper than the interpreter's recursion limit makes msgspec raise
RecursionError, which is the payload's fault like any other (left out, it would end the
consumer's loop on that record at every restart). A message encodes itself (`.encode()`).
msgspec was measured faster than a pydantic discriminated union on the events consumer's hot
path: see `benchmarks/codec.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import msgspec

from core.command_messages import (
    COMMAND_KINDS,
    COMMAND_TYPES,
    AnyCommand,
    Command,
    Delete,
    Deploy,
    Run,
    Stop,
)
from core.messages import (
    EVENT_KINDS,
    EVENT_TYPES,
    MAX_REASON,
    SCHEMA,
    AnyEvent,
    BatchState,
    CodecError,
    Event,
    StepOffsets,
    StepState,
    check_event,
    check_ts,
    clock_guesses,
    derived_id,
    id_chars_only,
)

__all__ = [
    "COMMAND_KINDS", "COMMAND_TYPES", "EVENT_KINDS", "EVENT_TYPES", "MAX_REASON", "SCHEMA",
    "AnyCommand", "AnyEvent", "BatchState", "CodecError", "Command", "Delete", "Deploy",
    "Event", "Run", "StepOffsets", "StepState", "Stop", "decode_command", "decode_event",
    "decode_events", "derived_id",
]

_EVENTS: Final = msgspec.json.Decoder(AnyEvent)
_COMMANDS: Final = msgspec.json.Decoder(AnyCommand)


# What a decode raises on bad bytes. Besides msgspec's DecodeError (and ValidationError, its
# subclass): RecursionError for JSON nested too deep (msgspec recurses per level, even
# through a field it skips: `{"x": [[[...]]]}` 1,000 deep, 2 KB, is enough), and, should one
# escape msgspec's wrapping into ValidationError, a ValueError or TypeError from a class's
# own checks (`__post_init__`). All are about the bytes: no retry can change them.
_UNDECODABLE: Final = (msgspec.DecodeError, RecursionError, ValueError, TypeError)


def _reason(what: str, exc: Exception) -> CodecError:
    if isinstance(exc, msgspec.ValidationError):
        return CodecError(f"invalid {what}: {exc}")
    if isinstance(exc, msgspec.DecodeError):
        return CodecError(f"not JSON: {exc}")
    if isinstance(exc, RecursionError):
        return CodecError(f"invalid {what}: nested too deep ({exc})")
    return CodecError(f"invalid {what}: {exc}")


def decode_event(raw: bytes | None) -> Event:
    if not raw:
        raise CodecError("empty message")
    try:
        event: Event = _EVENTS.decode(raw)
        clock_guesses([event], event.ts)
        check_event(event)
    except _UNDECODABLE as exc:
        raise _reason("event", exc) from None
    return event


def decode_events(raws: Sequence[bytes | None]) -> list[Event | CodecError]:
    """`decode_event` of each, in order, with the refusals returned in their places instead
    of raised: the events consumer's hot path. The ids of all the events are joined and
    checked in one C-level pass, and their latest `ts` once; only when that fails is each
    event checked alone (`check_event`). Checked one by one, the ids cost the consumer
    about as much as msgspec's decode itself (a Python call per event)."""
    decode = _EVENTS.decode
    out: list[Any] = []
    add = out.append
    for raw in raws:
        if not raw:
            add(CodecError("empty message"))
            continue
        try:
            add(decode(raw))
        except _UNDECODABLE as exc:
            add(_reason("event", exc))
    ids: list[str] = []
    push, extend = ids.append, ids.extend
    latest = 0.0
    for event in out:
        if type(event) is StepOffsets:
            # Most of a fast stream: its `id_fields` and `id_maps` read inline.
            push(event.event_id)
            push(event.batch_id)
            push(event.pipeline_id)
            push(event.step)
            extend(event.offsets)
            if event.totals:
                extend(event.totals)
        elif isinstance(event, Event):
            extend([getattr(event, name) for name in event.id_fields])
            for name in event.id_maps:
                extend(getattr(event, name))
        else:
            continue  # refused already
        if event.ts > latest:
            latest = event.ts
    latest = clock_guesses(out, latest)
    try:
        check_ts(latest)
        checked = id_chars_only("".join(ids))
    except CodecError:
        checked = False
    if not checked:
        for n, event in enumerate(out):
            if isinstance(event, Event):
                try:
                    check_event(event)
                except CodecError as exc:
                    out[n] = _reason("event", exc)
    return out


def decode_command(raw: bytes | None) -> Command:
    if not raw:
        raise CodecError("empty message")
    try:
        command: Command = _COMMANDS.decode(raw)
    except _UNDECODABLE as exc:
        raise _reason("command", exc) from None
    return command
