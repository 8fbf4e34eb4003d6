"""The Kafka messages: one typed class per command and per event kind (msgspec structs).

Every message carries `schema` (1), `type` (the tag choosing its class), a unique
`event_id`, `batch_id`, `pipeline_id` and `ts`. The constraints are declared on the fields
(ids, state names, offset ranges, lengths), so one msgspec decode validates a message
(`core.codec`) and the same declarations give the JSON Schemas published in `schemas/`
(`core.jsonschemas`).

`Event(type, batch_id, pipeline_id, ...)` (and `Command(...)` in `core.command_messages`)
build the class of that kind, so callers need not name the classes. This module holds the
events and what every message shares.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Final, Literal

import msgspec

from core.models import (
    MAX_OFFSET,
    OUTCOMES,
    UUID_REGEX,
    BatchStateName,
    OutcomeName,
    StepStateName,
    iso_of,
)

SCHEMA: Final = 1
MAX_REASON: Final = 2000
MAX_TEXT: Final = 256
MAX_ID: Final = 128
_ONLY_ID_CHARS: Final = re.compile(r"[A-Za-z0-9._-]*").fullmatch
_ID_CHARS: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"


def id_chars_only(text: str) -> bool:
    """`_ONLY_ID_CHARS`, faster (C's translate instead of a regex): the check every decoded
    message makes on its ids joined, on the events consumer's hot path."""
    return text.isascii() and not text.encode().translate(None, _ID_CHARS)
# core.models.ID_PATTERN, anchored so a trailing newline fails too: JSON Schema validators
# search with `$`, which Python's `re` also matches before a final "\n".
ID_REGEX: Final = r"^[A-Za-z0-9._-]{1,128}$(?!\n)"

# Ids are checked in two parts: the length natively by msgspec, the characters after the
# decode (`check_event`; `core.codec.decode_events`: one C-level pass over a poll's ids
# joined). A regex per id, as msgspec's `pattern` runs it, made decoding 3-5x slower on the
# consumer's hot path.
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID,
                                 extra_json_schema={"pattern": ID_REGEX})]
# A deploy concerns a pipeline version, not a batch: its batch_id is empty.
IdOrEmpty = Annotated[str, msgspec.Meta(
    max_length=MAX_ID, extra_json_schema={"pattern": r"^(?:[A-Za-z0-9._-]{1,128})?$(?!\n)"})]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
# A flow run id that is no UUID names no flow run, and every Prefect call made with it
# failed (the reconciler's whole round, a stop's clean-up): refused at the door. A regex,
# but only on batch.state events, which are few.
FlowRunId = Annotated[str, msgspec.Meta(pattern=UUID_REGEX)]
# Seconds since the epoch. The latest stop decides a batch's outcome, so a `ts` far ahead
# (milliseconds sent for seconds) would outrank every real end for ever: refused beyond a
# day ahead of the clock checking it (clocks of producers may differ, by far less than
# that). A decode takes one a clock could have written as a guess instead (`clock_guesses`).
Timestamp = Annotated[float, msgspec.Meta(ge=0)]
MAX_TS_AHEAD_S: Final = 86_400.0
# Past this (the year 2286) a `ts` is no clock's, however far off: milliseconds or worse.
MAX_CLOCK_TS: Final = 10_000_000_000.0
Reason = Annotated[str, msgspec.Meta(max_length=MAX_REASON)]
# Offsets travel through Lua as doubles: above 2**53 they would lose precision.
Offset = Annotated[int, msgspec.Meta(ge=0, le=MAX_OFFSET)]
Offsets = Annotated[dict[Id, Offset], msgspec.Meta(min_length=1)]
Totals = dict[Id, Offset]
Outcome = OutcomeName

ENCODER: Final = msgspec.json.Encoder()


class CodecError(ValueError):
    """A message that cannot be applied; its text is the dead-letter reason."""


def new_message_id() -> str:
    return uuid.uuid4().hex


def check_ts(ts: float) -> None:
    """Refuses a `ts` more than a day ahead: a stamp in milliseconds would win every
    comparison of times for ever."""
    if ts > time.time() + MAX_TS_AHEAD_S:
        raise CodecError(f"ts {ts!r} is more than {MAX_TS_AHEAD_S:.0f} s ahead of now: ts is in "
                         "seconds since the epoch")


def clock_guesses(events: Sequence[object], latest: float) -> float:
    """A decoded event stamped more than a day ahead by a clock that is off (a worker's:
    its run's states, its steps' states and offsets) gets `ts` 0, a guess any real time
    beats, as the bridge's `state_time` does for the same run's Prefect states: refused, the
    run's offsets were lost for good. One whose `ts` is no clock's (`MAX_CLOCK_TS`) is left
    to be refused. Returns the events' latest `ts` afterwards."""
    ahead = time.time() + MAX_TS_AHEAD_S
    if latest <= ahead:
        return latest
    latest = 0.0
    for event in events:
        if isinstance(event, Event):
            if ahead < event.ts <= MAX_CLOCK_TS:
                event.ts = 0.0
            latest = max(latest, event.ts)
    return latest


def derived_id(prefix: str, base: str) -> str:
    """`prefix` + `base` as an event id, hashed when that passes MAX_ID characters (a batch
    id may have 128 itself): the same inputs always give the same id, so a repeat is still
    recognised as one."""
    event_id = prefix + base
    if len(event_id) > MAX_ID:
        event_id = prefix + hashlib.blake2b(base.encode(), digest_size=16).hexdigest()
    return event_id


def refuse_ids(owner: object, names: tuple[str, ...], extra: Iterable[str] = ()) -> None:
    """Raises naming the first id with a character outside [A-Za-z0-9._-] (raised inside
    a decode, msgspec turns it into a ValidationError with this text)."""
    for name in names:
        value = getattr(owner, name)
        if not _ONLY_ID_CHARS(value):
            raise CodecError(f"invalid {name} {value[:140]!r}: ids are [A-Za-z0-9._-]{{1,128}}")
    for value in extra:
        if not _ONLY_ID_CHARS(value):
            raise CodecError(f"invalid partition name {value[:140]!r}: "
                             "ids are [A-Za-z0-9._-]{1,128}")


# -- events --------------------------------------------------------------------------------


class _EventMeta(msgspec.StructMeta):
    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is Event:
            return _new_event(*args, **kwargs)
        return super().__call__(*args, **kwargs)


def _absent(name: str) -> property:
    """An attribute this kind of event does not carry: reads None, refuses a value."""

    def get(self: Event) -> None:
        return None

    def put(self: Event, value: object) -> None:
        if value is not None:
            raise AttributeError(f"a {self.type} event has no {name}")

    return property(get, put)


class Event(msgspec.Struct, metaclass=_EventMeta, kw_only=True, tag_field="type",
            omit_defaults=True, gc=False):
    """A change to apply to a batch; one subclass per `type` (BatchState, StepState,
    StepOffsets). The fields of other kinds read None here, so code that handles every
    kind (coalescing, logging) needs no isinstance chain."""

    type: ClassVar[str]
    schema: Literal[1]
    event_id: Id
    batch_id: Id
    pipeline_id: Id
    ts: Timestamp

    if TYPE_CHECKING:
        # What `Event(...)` accepts: the class of `type` is built (see _new_event).
        def __init__(self, type: str, batch_id: str, pipeline_id: str, *,
                     event_id: str = ..., ts: float = ..., state: str | None = None,
                     outcome: str | None = None, reason: str | None = None,
                     flow_run_id: str | None = None, step: str | None = None,
                     offsets: dict[str, int] | None = None,
                     totals: dict[str, int] | None = None) -> None: ...

        state: str | None
        outcome: str | None
        reason: str | None
        flow_run_id: str | None
        step: str | None
        offsets: dict[str, int] | None
        totals: dict[str, int] | None
    else:
        state = _absent("state")
        outcome = _absent("outcome")
        reason = _absent("reason")
        flow_run_id = _absent("flow_run_id")
        step = _absent("step")
        offsets = _absent("offsets")
        totals = _absent("totals")

    # The fields holding ids, and those whose keys are ids (partition names): what
    # `check_event` reads. Every one becomes part of a Redis key or a hash field.
    id_fields: ClassVar[tuple[str, ...]] = ("event_id", "batch_id", "pipeline_id")
    id_maps: ClassVar[tuple[str, ...]] = ()

    def encode(self) -> bytes:
        return ENCODER.encode(self)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(self)
        return out

    def to_script(self) -> list[Any]:
        """The compact array `APPLY_EVENTS` reads (see there; offsets as strings: a Lua
        number written back keeps only 14 digits)."""
        raise NotImplementedError


class BatchState(Event, tag="batch.state", kw_only=True):
    """The batch entered `state`; a stop carries its outcome (and why, when not completed)."""

    type: ClassVar[str] = "batch.state"
    state: BatchStateName
    outcome: Outcome | None = None
    reason: Reason | None = None
    flow_run_id: FlowRunId | None = None

    def __post_init__(self) -> None:
        # A stop without its outcome would read `completed` (nothing says otherwise), and an
        # outcome on any other state would be dropped without a word: both are refused.
        if self.state == "stop":
            if self.outcome is None:
                raise CodecError("a batch.state stop carries its outcome: one of "
                                 + ", ".join(OUTCOMES))
        elif self.outcome is not None or self.reason is not None:
            raise CodecError(f"outcome and reason belong to a stop, not to {self.state!r}")

    def to_script(self) -> list[Any]:
        # The latest stop decides the outcome (APPLY_EVENTS): its ts goes along, as repr to
        # keep every digit; other states do not read it.
        ts = repr(self.ts) if self.state == "stop" else None
        return ["b", self.event_id, self.state, self.outcome, self.reason, self.flow_run_id, ts]


class StepState(Event, tag="step.state", kw_only=True):
    """One step of the batch entered `state`."""

    type: ClassVar[str] = "step.state"
    id_fields: ClassVar[tuple[str, ...]] = ("event_id", "batch_id", "pipeline_id", "step")
    step: Id
    state: StepStateName

    def to_script(self) -> list[Any]:
        # A final state's ts goes along (APPLY_EVENTS: the later end of a step holds), and
        # a start's, in `now_iso`'s form: the step's rate counts from it.
        ts: str | None = None
        if self.state in ("success", "failed"):
            ts = repr(self.ts)
        elif self.state == "running":
            ts = iso_of(self.ts)
        return ["s", self.event_id, self.step, self.state, ts]


class StepOffsets(Event, tag="step.offsets", kw_only=True):
    """How far one step got: records processed per partition (they only grow), and, when
    the step knows them, how many records each of those partitions holds (`totals`: with a
    total for every partition it reported, the batch shows percent and ETA)."""

    type: ClassVar[str] = "step.offsets"
    step: Id
    offsets: Offsets
    totals: Totals = msgspec.field(default_factory=dict)
    id_fields: ClassVar[tuple[str, ...]] = ("event_id", "batch_id", "pipeline_id", "step")
    id_maps: ClassVar[tuple[str, ...]] = ("offsets", "totals")

    def to_script(self) -> list[Any]:
        # No id: offsets apply by value, never de-duplicated by id.
        out: list[Any] = ["o", self.step]
        for part, value in self.offsets.items():
            out += (part, str(value))
        return out


EVENT_KINDS: Final[dict[str, type[Event]]] = {
    c.type: c for c in (BatchState, StepState, StepOffsets)}
EVENT_TYPES: Final = frozenset(EVENT_KINDS)
AnyEvent = BatchState | StepState | StepOffsets


def check_event(event: Event) -> None:
    """Raises CodecError for an id with a character outside [A-Za-z0-9._-] or a `ts` more
    than a day ahead: what msgspec's declarations cannot say. Every way to an `Event` runs
    it (`Event(...)`, `core.codec`'s decodes, which check a poll's events at once)."""
    maps = [name for field in event.id_maps for name in getattr(event, field)]
    if not id_chars_only("".join([*(getattr(event, f) for f in event.id_fields), *maps])):
        refuse_ids(event, event.id_fields, maps)
    check_ts(event.ts)


def _new_event(type: str, batch_id: str, pipeline_id: str, *,
               event_id: str | None = None, ts: float | None = None,
               **fields: Any) -> Event:
    # Any: mypy would check the call against Event's facade signature, not the kind's.
    kind: Any = EVENT_KINDS.get(type)
    if kind is None:
        raise CodecError(f"unknown event type {type!r}; known: {sorted(EVENT_KINDS)}")
    # None means "not set", as for the fields a kind does not carry.
    given = {k: v for k, v in fields.items() if v is not None}
    event: Event = kind(schema=SCHEMA, event_id=event_id or new_message_id(), batch_id=batch_id,
                        pipeline_id=pipeline_id, ts=time.time() if ts is None else ts, **given)
    check_event(event)
    return event
