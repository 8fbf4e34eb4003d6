"""Domain vocabulary: states, ids, the pipeline definition and the batch object's shape."""

from __future__ import annotations

import os
import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator
from typing_extensions import TypeAliasType

BatchStateName = Literal["pending", "scheduled", "running", "stop"]
StepStateName = Literal["none", "pending", "running", "success", "failed"]
OutcomeName = Literal["completed", "failed", "cancelled", "crashed"]
BATCH_STATES: Final[tuple[str, ...]] = get_args(BatchStateName)
STEP_STATES: Final[tuple[str, ...]] = get_args(StepStateName)
FINAL_STEP_STATES: Final = frozenset({"success", "failed"})
OUTCOMES: Final[tuple[str, ...]] = get_args(OutcomeName)

ID_PATTERN: Final = r"^[A-Za-z0-9._-]{1,128}$"
_ID_RE: Final = re.compile(ID_PATTERN)
# Prefect's flow run ids: UUIDs in their canonical text form.
UUID_REGEX: Final = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
_UUID_RE: Final = re.compile(UUID_REGEX)


def is_uuid(text: str) -> bool:
    return _UUID_RE.fullmatch(text) is not None


# Offsets travel through Lua as doubles; above 2**53 they would lose precision.
MAX_OFFSET: Final = 2**53 - 1

_CROCKFORD: Final = "0123456789abcdefghjkmnpqrstvwxyz"


# A step's config travels as JSON through Redis (Lua reads numbers as doubles), Kafka and
# Prefect: numbers beyond 2**53 would be rounded or refused (orjson stops at 64 bits), so
# they are refused on the way in, as documented in the schema.
MAX_CONFIG_NUMBER: Final = 2**53 - 1
MAX_CONFIG_DEPTH: Final = 32

ConfigValue = TypeAliasType(
    "ConfigValue",
    "bool | Annotated[int, Field(ge=-MAX_CONFIG_NUMBER, le=MAX_CONFIG_NUMBER)]"
    " | Annotated[float, Field(ge=-MAX_CONFIG_NUMBER, le=MAX_CONFIG_NUMBER, allow_inf_nan=False)]"
    " | str | list[ConfigValue] | dict[str, ConfigValue] | None",
)


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def valid_id(value: str) -> bool:
    return _ID_RE.fullmatch(value) is not None


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_of(ts: float) -> str:
    """Seconds since the epoch in `now_iso`'s form (such strings compare as their times)."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def new_batch_id() -> str:
    """`batch-` + 26 chars: 48-bit millisecond time then 80 random bits (sortable, URL-safe),
    in lower-case Crockford base 32."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    # Two digits (10 bits) per step from a table: 13 look-ups instead of 26 shifts, on every POST.
    pairs = _DIGIT_PAIRS
    return "batch-" + "".join([pairs[value >> shift & 1023] for shift in _PAIR_SHIFTS])


def batch_id_ms(batch_id: str) -> int | None:
    """The millisecond time `new_batch_id` put in `batch_id`; None for an id it did not make
    (a published one)."""
    digits = batch_id.removeprefix("batch-")
    if len(digits) != 26 or len(batch_id) != 32:
        return None
    value = 0
    for char in digits[:10]:  # 10 digits: 50 bits, 2 of padding then the 48-bit time
        index = _CROCKFORD.find(char)
        if index < 0:
            return None
        value = value << 5 | index
    return value


_DIGIT_PAIRS: Final = tuple(_CROCKFORD[n >> 5] + _CROCKFORD[n & 31] for n in range(1024))
_PAIR_SHIFTS: Final = tuple(range(120, -1, -10))


def deployment_name(pipeline_name: str) -> str:
    return f"run-pipeline/{pipeline_name}"


class StepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=ID_PATTERN)
    uses: str = Field(min_length=1, max_length=256)
    config: dict[str, ConfigValue] = Field(default_factory=dict)

    @field_validator("config")
    @classmethod
    def _shallow_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        if _depth(config) > MAX_CONFIG_DEPTH:
            raise ValueError(f"config nests deeper than {MAX_CONFIG_DEPTH} levels")
        return config


class PipelineSpec(BaseModel):
    """One version of a pipeline, as registered with `PUT /api/v1/pipelines/{id}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=ID_PATTERN)
    version: str = Field(pattern=ID_PATTERN)
    steps: list[StepSpec] = Field(min_length=1, max_length=100)

    @field_validator("steps")
    @classmethod
    def _unique_step_names(cls, steps: list[StepSpec]) -> list[StepSpec]:
        names = [s.name for s in steps]
        if len(set(names)) != len(names):
            raise ValueError("step names must be unique")
        return steps

    @property
    def step_names(self) -> list[str]:
        return [s.name for s in self.steps]


class RunRequest(BaseModel):
    """The optional body of `POST /api/v1/batches/{pipeline_id}` and of a resume: per-step
    config overrides, merged key by key over the registered config (or, for a resume, over
    the resumed batch's) and checked by each step implementation's config model."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="RunRequest")

    config: dict[str, dict[str, ConfigValue]] = Field(
        default_factory=dict,
        description="step name -> the keys of its config to set for this run; a key set to "
                    "null is set to null (e.g. `fail_at: null` turns a failure point off)",
        examples=[{"transform": {"throttle": 500}}])

    @field_validator("config")
    @classmethod
    def _shallow_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        if _depth(config) > MAX_CONFIG_DEPTH + 1:
            raise ValueError(f"config nests deeper than {MAX_CONFIG_DEPTH} levels")
        return config


# -- how a batch is named on the Prefect side --------------------------------------------
FLOW_NAME: Final = "run-pipeline"
TAG_DHUB: Final = "dhub"
TAG_BATCH_PREFIX: Final = "dhub-batch:"
TAG_PIPELINE_PREFIX: Final = "dhub-pipeline:"


def flow_run_tags(batch_id: str, pipeline_id: str, pipeline_version: str) -> list[str]:
    """Tags every dhub flow run carries, so any Prefect event traces back to its batch."""
    return [TAG_DHUB, TAG_BATCH_PREFIX + batch_id, TAG_PIPELINE_PREFIX + pipeline_id,
            f"dhub-version:{pipeline_version}"]


def batch_id_from_tags(tags: list[str]) -> tuple[str, str] | None:
    """(pipeline_id, batch_id) from a flow run's tags, or None for a run that is not dhub's."""
    batch = next((t[len(TAG_BATCH_PREFIX):] for t in tags if t.startswith(TAG_BATCH_PREFIX)), None)
    pipeline = next(
        (t[len(TAG_PIPELINE_PREFIX):] for t in tags if t.startswith(TAG_PIPELINE_PREFIX)), None
    )
    if batch is None or pipeline is None:
        return None
    return pipeline, batch
