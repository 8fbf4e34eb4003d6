"""The Kafka message codec: bytes to the typed classes of `core.messages` and back.

`decode_event` and `decode_command` parse and validate in one msgspec call and raise
`CodecError` with msgspec's reason (what and where) for the dead-letter topic; a message
encodes itself (`.encode()`). msgspec was measured faster than a pydantic discriminated
union on the events consumer's hot path: see `benchmarks/codec.py`.
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
)

__all__ = [
    "COMMAND_KINDS", "COMMAND_TYPES", "EVENT_KINDS", "EVENT_TYPES", "MAX_REASON", "SCHEMA",
    "AnyCommand", "AnyEvent", "BatchState", "CodecError", "Command", "Delete", "Deploy",
    "Event", "Run", "StepOffsets", "StepState", "Stop", "decode_command", "decode_event",
]

_EVENTS: Final = msgspec.json.Decoder(AnyEvent)
_COMMANDS: Final = msgspec.json.Decoder(AnyCommand)


def _reason(what: str, exc: msgspec.DecodeError) -> CodecError:
    if isinstance(exc, msgspec.ValidationError):
        return CodecError(f"invalid {what}: {exc}")
    return CodecError(f"not JSON: {exc}")


def decode_event(raw: bytes | None) -> Event:
    if not raw:
        raise CodecError("empty message")
    try:
        event: Event = _EVENTS.decode(raw)
    except msgspec.DecodeError as exc:
        raise _reason("event", exc) from None
    return event


def decode_command(raw: bytes | None) -> Command:
    if not raw:
        raise CodecError("empty message")
    try:
        command: Command = _COMMANDS.decode(raw)
    except msgspec.DecodeError as exc:
        raise _reason("command", exc) from None
    return command
