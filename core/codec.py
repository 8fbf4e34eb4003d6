"""The Kafka message codec: bytes to the typed classes of `core.messages` and back.

`decode_event` and `decode_command` parse and validate in one msgspec call and raise
`CodecError` with msgspec's reason (what and where) for the dead-letter topic, whatever the
bytes: a payload nested deeper than the interpreter's recursion limit makes msgspec raise
RecursionError, which is the payload's fault like any other (left out, it would end the
consumer's loop on that record at every restart). A message encodes itself (`.encode()`).
msgspec was measured faster than a pydantic discriminated union on the events consumer's hot
path: see `benchmarks/codec.py`.
"""

from __future__ import annotations

from typing import Final

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
    derived_id,
)

__all__ = [
    "COMMAND_KINDS", "COMMAND_TYPES", "EVENT_KINDS", "EVENT_TYPES", "MAX_REASON", "SCHEMA",
    "AnyCommand", "AnyEvent", "BatchState", "CodecError", "Command", "Delete", "Deploy",
    "Event", "Run", "StepOffsets", "StepState", "Stop", "decode_command", "decode_event",
    "derived_id",
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
    except _UNDECODABLE as exc:
        raise _reason("event", exc) from None
    return event


def decode_command(raw: bytes | None) -> Command:
    if not raw:
        raise CodecError("empty message")
    try:
        command: Command = _COMMANDS.decode(raw)
    except _UNDECODABLE as exc:
        raise _reason("command", exc) from None
    return command
