"""The Kafka commands: one typed class per kind (msgspec structs), as `core.messages` holds
the events. `Command(type, batch_id, pipeline_id, ...)` builds the class of that kind.

The API sends its commands after it recorded the batch. A service upstream may also publish
commands itself (README, "Publishing commands to Kafka"): its `run` carries `create`, the
creation request a POST would make, so the consumer creates the batch when it is absent; a
run without one never creates anything (a batch deleted since stays deleted)."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Final, Literal

import msgspec
import orjson

from core import keys, layout
from core.messages import (
    ENCODER,
    MAX_ID,
    SCHEMA,
    CodecError,
    Id,
    IdOrEmpty,
    Timestamp,
    check_ts,
    id_chars_only,
    new_message_id,
    refuse_ids,
)
from core.models import MAX_OFFSET, STEP_STATES
from core.packed_values import ms_of

# What a publisher's own batch ids look like: `batch-` and 1 to 122 id characters (the API's
# ids have the same prefix, so one id space). The whole id stays an `Id` (at most 128).
PUBLISHED_BATCH_PREFIX: Final = "batch-"
PUBLISHED_BATCH_REGEX: Final = r"^batch-[A-Za-z0-9._-]{1,122}$(?!\n)"
# `core.models.now_iso`'s form, as a recorded creation time must be. (Not "not ahead of now"
# here: the API records what Redis holds, which an API host's clock far ahead may have
# raised; the consumer's restore refuses one far ahead, `CommandEffects._restored`.)
ISO_MS_REGEX: Final = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$(?!\n)"


class _CommandMeta(msgspec.StructMeta):
    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is Command:
            return _new_command(*args, **kwargs)
        return super().__call__(*args, **kwargs)


class Command(msgspec.Struct, metaclass=_CommandMeta, kw_only=True, tag_field="type"):
    """What the API asks of the commands consumer; one subclass per `type` (Run, Stop,
    Delete, Deploy)."""

    type: ClassVar[str]
    schema: Literal[1]
    event_id: Id
    batch_id: Id
    pipeline_id: Id
    # "" when a run, stop or delete does not name one (the batch's recorded version).
    pipeline_version: IdOrEmpty = ""
    ts: Timestamp  # negative refused by the decoder and the published schema alike

    if TYPE_CHECKING:
        def __init__(self, type: str, batch_id: str, pipeline_id: str,
                     pipeline_version: str = "", *, event_id: str = ...,
                     ts: float = ..., create: Creation | msgspec.UnsetType = ...,
                     recorded: Recorded | msgspec.UnsetType = ...,
                     abandoned: bool | msgspec.UnsetType = ...) -> None: ...

    def __post_init__(self) -> None:
        ids = self.event_id + self.batch_id + self.pipeline_id + self.pipeline_version
        if not id_chars_only(ids):
            refuse_ids(self, ("event_id", "batch_id", "pipeline_id", "pipeline_version"))
        # A command's time decides against a run's own end (a give-up's `failed` carries
        # it), so one far ahead would outrank every real end; none is that far off by skew.
        check_ts(self.ts)

    @property
    def key(self) -> bytes:
        """The Kafka key: one batch's (or one pipeline's) commands stay in order."""
        return (self.batch_id or self.pipeline_id).encode()

    def encode(self) -> bytes:
        return ENCODER.encode(self)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(self)
        return out


class Creation(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A publisher's request to create the batch, as `POST /api/v1/batches/{pipeline_id}`
    with a body would: the run's per-step config overrides (step name -> key -> JSON value),
    merged over the version's registered config and checked by each step's config model when
    the command is applied. Unknown fields are refused here, unlike elsewhere in a message:
    a misspelt `config` must not create a batch with the defaults."""

    config: dict[Id, dict[str, Any]] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        # Step names are ids: their characters checked as the message's ids are (the length
        # msgspec checked), so the decoder refuses what the published schema does.
        if self.config and not id_chars_only("".join(self.config)):
            bad = next(name for name in self.config if not id_chars_only(name))
            raise CodecError(f"invalid step name {bad[:140]!r} in create.config: "
                             "ids are [A-Za-z0-9._-]{1,128}")


# The fields a create may add to a fresh batch's (`core.layout`: the effective config, a
# resumed batch's origin, steps done, offsets, totals and work done before the resume).
_RECORDED_FIELDS: Final = frozenset({layout.CONFIG, layout.RESUMED_FROM})
_RECORDED_PREFIXES: Final = (layout.STEP_PREFIX, layout.OFFSET_PREFIX, layout.TOTAL_PREFIX,
                             layout.RESUMED_PREFIX)


def recordable(name: str) -> bool:
    """Whether a batch's field is one a create adds to a fresh batch's (`Recorded.extra`)."""
    return name in _RECORDED_FIELDS or name.startswith(_RECORDED_PREFIXES)


class Recorded(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What the API recorded in Redis for the batch it asks to run: its place in the
    pipeline's order, its creation time and its fields beyond a fresh batch's (effective
    config, a resumed batch's offsets). The commands consumer does not read it: a rebuild of
    Redis does, for a batch whose run command was not taken yet when Redis was lost (taking
    it writes the batch's creation snapshot: `core.snapshots`)."""

    seq: Annotated[int, msgspec.Meta(ge=1, le=MAX_OFFSET)]
    created_at: Annotated[str, msgspec.Meta(pattern=ISO_MS_REGEX)]
    extra: dict[str, str] = msgspec.field(default_factory=dict)
    # The Idempotency-Key record the API commits once the command is queued
    # (`service.idempotency`): its Redis key and its committed value; '' without a key.
    idempotency_key: str = ""
    idempotency_record: str = ""

    def __post_init__(self) -> None:
        # A rebuild raises the pipeline's counter to it: past Redis's integers (or a double's
        # exact ones), every later POST's INCR fails.
        if not 1 <= self.seq <= MAX_OFFSET:
            raise CodecError(f"invalid recorded.seq {self.seq}: a batch's sequence is 1 to "
                             f"{MAX_OFFSET}")
        # The pattern is checked by a decode, not by a construction (the API's own).
        if not _ISO_MS.search(self.created_at) or ms_of(self.created_at) is None:
            raise CodecError(f"invalid recorded.created_at {self.created_at[:40]!r}: "
                             "YYYY-MM-DDTHH:MM:SS.mmmZ")
        # Only what a create adds to a fresh batch, each in the form its readers parse: a
        # rebuild (and the consumer, for a batch Redis lost) writes them as they are.
        for name, value in self.extra.items():
            problem = _extra_problem(name, value)
            if problem:
                raise CodecError(f"invalid recorded.extra field {name[:140]!r}: {problem}")
        if self.idempotency_key and not _IDEMPOTENCY_KEY.fullmatch(self.idempotency_key):
            raise CodecError("invalid recorded.idempotency_key: not an Idempotency-Key record's")


_ISO_MS: Final = re.compile(ISO_MS_REGEX)
_DECIMAL: Final = re.compile(r"0|[1-9][0-9]{0,15}")
_IDEMPOTENCY_KEY: Final = re.compile(re.escape(keys.idempotency("@")).replace("@", "[0-9a-f]{64}"))


def _extra_problem(name: str, value: str) -> str | None:
    """What is wrong with a recorded field's value, in the form `core.layout` reads it."""
    if name.startswith((layout.OFFSET_PREFIX, layout.TOTAL_PREFIX, layout.RESUMED_PREFIX)):
        if not _DECIMAL.fullmatch(value) or int(value) > MAX_OFFSET:
            return f"not a count of records (0 to {MAX_OFFSET})"
    elif name.startswith(layout.STEP_PREFIX):
        if value not in STEP_STATES:
            return f"not a step state ({', '.join(STEP_STATES)})"
    elif name == layout.RESUMED_FROM:
        if not (0 < len(value) <= MAX_ID and id_chars_only(value)):
            return "not a batch id"
    elif name == layout.CONFIG:
        try:
            config = orjson.loads(value)
        except orjson.JSONDecodeError:
            return "not JSON"
        if not (isinstance(config, dict)
                and all(isinstance(step, dict) for step in config.values())):
            return "not a step name -> config object"
    else:
        return "not a field a create adds"
    return None


class Run(Command, tag="run", kw_only=True):
    """Start the batch: create its flow run. With `create` (a publisher's command), first
    create the batch unless it exists; `pipeline_version` "" then means the latest."""

    type: ClassVar[str] = "run"
    # UNSET, not None: absent from the API's run command as encoded before `create` existed,
    # and a `null` is refused rather than read as "no creation request".
    create: Creation | msgspec.UnsetType = msgspec.UNSET
    # The API's own runs (never with `create`); absent from the runs it sent before.
    recorded: Recorded | msgspec.UnsetType = msgspec.UNSET

    @property
    def creation(self) -> Creation | None:
        return self.create if isinstance(self.create, Creation) else None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.creation is not None and not (
                self.batch_id.startswith(PUBLISHED_BATCH_PREFIX)
                and len(self.batch_id) > len(PUBLISHED_BATCH_PREFIX)):
            raise CodecError(f"invalid batch_id {self.batch_id[:140]!r}: a run that creates "
                             "its batch names it 'batch-' + 1 to 122 of [A-Za-z0-9._-]")


class Stop(Command, tag="stop", kw_only=True):
    """Stop the batch: cancel its flow runs."""

    type: ClassVar[str] = "stop"


class Delete(Command, tag="delete", kw_only=True):
    """Delete the batch: cancel and delete its flow runs, purge its record."""

    type: ClassVar[str] = "delete"
    # True from an API process that gave the batch up after its run command's send went
    # unanswered (`service.abandon`): it released the batch's Idempotency-Key, so a rebuild
    # must not restore the key's record from the run command. Absent otherwise (and from
    # the deletes sent before it existed).
    abandoned: bool | msgspec.UnsetType = msgspec.UNSET


class Deploy(Command, tag="deploy", kw_only=True):
    """Creates or updates a pipeline version's deployment; keyed by the pipeline."""

    type: ClassVar[str] = "deploy"
    batch_id: IdOrEmpty = ""
    pipeline_version: Id


COMMAND_KINDS: Final[dict[str, type[Command]]] = {
    c.type: c for c in (Run, Stop, Delete, Deploy)}
COMMAND_TYPES: Final = frozenset(COMMAND_KINDS)
AnyCommand = Run | Stop | Delete | Deploy


def _new_command(type: str, batch_id: str, pipeline_id: str,
                 pipeline_version: str = "", *, event_id: str | None = None,
                 ts: float | None = None, **fields: Any) -> Command:
    kind: Any = COMMAND_KINDS.get(type)
    if kind is None:
        raise CodecError(f"unknown command type {type!r}; known: {sorted(COMMAND_KINDS)}")
    command: Command = kind(schema=SCHEMA, event_id=event_id or new_message_id(), batch_id=batch_id,
                            pipeline_id=pipeline_id, pipeline_version=pipeline_version,
                            ts=time.time() if ts is None else ts, **fields)
    return command

