"""The batch hash's layout, owned here: its field names, its state orders, and how it reads.

A batch is one Redis hash (`keys.batch`): the batch's own fields (`id`, `state`, `outcome`,
`reason`, `flow_run_id`, `rev`, `updated_at`, ...), `step:<name>` -> the step's state,
`off:<step>:<partition>` -> the step's offset there (a decimal string), `stop_ts` (the `ts` of
the stop event that decided `outcome`), `deleted` once hidden, `config` (the effective
per-step config, JSON) and, on a resumed batch, `resumed_from`. A finished batch is held
packed in Redis (`core.packing`: a few fields plain, the rest in one); its readers get the
whole hash back from `core.packing.unpacked`, which is what this module reads. Code outside
this module asks it (`is_visible`, `running_steps`, `render`) instead of parsing field
names, and the Lua scripts get their state orders from here (`lua_rank`), so each order is
written once.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Final, cast

import orjson
from typing_extensions import TypeIs

from core.models import (
    BATCH_STATES,
    FINAL_STEP_STATES,
    STEP_STATES,
    PipelineSpec,
    deployment_name,
)
from core.settings import get_settings

DELETED: Final = "deleted"
STEP_PREFIX: Final = "step:"
OFFSET_PREFIX: Final = "off:"
TOTAL_PREFIX: Final = "tot:"  # tot:<step>:<partition> -> records the partition holds
STARTED_PREFIX: Final = "started:"  # started:<step> -> when the step began running (ISO)
MOVED_PREFIX: Final = "moved:"  # moved:<step> -> when an offset of the step last grew (ISO)
# ended:<step> -> the `ts` of the event that gave the step its final state, in milliseconds:
# a later end replaces an earlier one (a rerun of a failed flow run that completes).
ENDED_PREFIX: Final = "ended:"
# resumed:<step> -> records the step had done when its batch was created (a resumed batch's
# first step not done): they are not counted in the step's rate.
RESUMED_PREFIX: Final = "resumed:"
# The batch's effective per-step config (JSON: step name -> config), written at creation;
# absent on batches created before run-time config, which run with the registered config.
CONFIG: Final = "config"
# The batch a resumed batch continues (its id), written at creation.
RESUMED_FROM: Final = "resumed_from"
_OFFSET_KIND: Final = OFFSET_PREFIX[:-1]
_TOTAL_KIND: Final = TOTAL_PREFIX[:-1]

# The order states only move forward in. Both final step states rank alike: between them the
# end with the greater `ts` holds (APPLY_EVENTS).
BATCH_RANK: Final[Mapping[str, int]] = {state: n for n, state in enumerate(BATCH_STATES)}
STEP_RANK: Final[Mapping[str, int]] = {
    state: min(n, STEP_STATES.index("success")) for n, state in enumerate(STEP_STATES)}


def lua_rank(rank: Mapping[str, int]) -> str:
    """A rank table as a Lua table constructor, for the scripts (core.scripts)."""
    return "{" + ", ".join(f"{state} = {n}" for state, n in rank.items()) + "}"


def step_field(step: str) -> str:
    return STEP_PREFIX + step


def offset_field(step: str, partition: str) -> str:
    return f"{OFFSET_PREFIX}{step}:{partition}"


def total_field(step: str, partition: str) -> str:
    return f"{TOTAL_PREFIX}{step}:{partition}"


def step_state(fields: Mapping[str, str], step: str) -> str:
    return fields.get(STEP_PREFIX + step, "none")


def step_offsets(fields: Mapping[str, str], step: str) -> dict[str, int]:
    """The step's offset per partition, as recorded in the hash."""
    return _per_partition(fields, OFFSET_PREFIX + step + ":")


def step_totals(fields: Mapping[str, str], step: str) -> dict[str, int]:
    return _per_partition(fields, TOTAL_PREFIX + step + ":")


def _per_partition(fields: Mapping[str, str], prefix: str) -> dict[str, int]:
    return {name[len(prefix):]: int(value) for name, value in fields.items()
            if name.startswith(prefix)}


def config_of(fields: Mapping[str, str]) -> dict[str, dict[str, Any]] | None:
    """The batch's effective per-step config; None for a batch created without one."""
    raw = fields.get(CONFIG)
    if raw is None:
        return None
    config: dict[str, dict[str, Any]] = orjson.loads(raw)
    return config


def creation_fields(pipeline_id: str, batch_id: str, spec: PipelineSpec, created_at: str,
                    extra: Mapping[str, str] | None = None) -> list[str]:
    """A new batch's hash (field, value, ...) as recorded at its creation, before Redis gives
    it its `seq` (`BatchStore.create`; a rebuild restoring a batch from its run command).
    `extra`: more fields (effective config, a resumed batch's offsets...); a name of the
    base fields replaces it (HSET's last wins)."""
    fields: list[str] = [
        "id", batch_id,
        "name", spec.name,
        "deployment", deployment_name(spec.name),
        "pipeline_id", pipeline_id,
        "pipeline_version", spec.version,
        "state", "pending",
        "steps", orjson.dumps(spec.step_names).decode(),
        "created_at", created_at,
        "updated_at", created_at,
        "rev", "1",
    ]  # fmt: skip
    for name in spec.step_names:
        fields += [step_field(name), "none"]
    for field, value in (extra or {}).items():
        fields += [field, value]
    return fields


def registered_config(spec: PipelineSpec) -> str:
    """The `config` field of a batch run with its version's registered config as it is (a run
    without overrides: not checked again, so a version registered before a step's model was
    tightened runs as it always did)."""
    return orjson.dumps({step.name: dict(step.config) for step in spec.steps}).decode()


def is_visible(fields: dict[str, str] | None) -> TypeIs[dict[str, str]]:
    """The batch exists and is not hidden (deleted or abandoned)."""
    return fields is not None and bool(fields) and DELETED not in fields


def created_before(first: Mapping[str, str], then: Mapping[str, str]) -> bool:
    """Whether batch `first` was created before batch `then`, of the same pipeline. By
    `created_at` first: a create raises it to the newest listed batch's (CREATE_BATCH), so a
    batch is never shown created before one that was listed when it was made, whatever the
    API hosts' clocks; then by `seq` (Redis's counter), for two in the same millisecond."""
    return ((first.get("created_at", ""), int(first.get("seq") or 0))
            < (then.get("created_at", ""), int(then.get("seq") or 0)))


def running_steps(fields: Mapping[str, str]) -> set[str]:
    return {name[len(STEP_PREFIX):] for name, state in fields.items()
            if name.startswith(STEP_PREFIX) and state == "running"}


def published_fields(payload: str) -> dict[str, str]:
    """The hash carried by a change message after its key (`keys.CHANGES_CHANNEL`): an
    object, or the flat array an older consumer publishes during a rolling upgrade."""
    hash_: dict[str, str] | list[str] = orjson.loads(payload)
    if isinstance(hash_, dict):
        return hash_
    return dict(zip(hash_[::2], hash_[1::2], strict=True))


@lru_cache(maxsize=4096)
def _natural(name: str) -> tuple[str, int, str]:
    """`partition_10` sorts after `partition_9`. Memoised: the same few partition names come
    back in every render, and the key was a third of a batch's render time. The name last:
    `p1` and `p01` tie on the rest, and left to the hash's order (Redis's insertion order,
    the packed form's, a published hash's) one body would render in two ETags."""
    head = name.rstrip("0123456789")
    tail = name[len(head) :]
    return head, int(tail) if tail else -1, name


def render(fields: Mapping[str, str]) -> dict[str, Any]:
    """The batch object of the contract (plus extra fields beside it) from its Redis hash."""
    steps: dict[str, dict[str, Any]] = {
        name: {"state": fields.get(STEP_PREFIX + name, "none"), "offsets": {}}
        for name in orjson.loads(fields["steps"])
    }
    totals: dict[str, dict[str, int]] = {}
    for field_name, value in fields.items():
        # One partition per field, not a prefix test per kind: this loop is most of a render.
        kind, _, rest = field_name.partition(":")
        if kind == _OFFSET_KIND:
            step, _, part = rest.partition(":")
            if step in steps:
                steps[step]["offsets"][part] = int(value)
        elif kind == _TOTAL_KIND:
            step, _, part = rest.partition(":")
            if step in steps:
                totals.setdefault(step, {})[part] = int(value)
    running = fields["state"] == "running"
    # A step still `running` in a batch stopped other than completed ran in a process that
    # is gone (cancelled, crashed, failed): nothing will end it, so it shows as it ended.
    # Decided here, not when stored, so the stored state stays the highest rank sent whatever
    # the order the events came in (a late Running still counts the same).
    ended = fields["state"] == "stop" and fields.get("outcome") != "completed"
    stalled_any = False
    for name, entry in steps.items():
        if ended and entry["state"] == "running":
            entry["state"] = "failed"
        if len(entry["offsets"]) > 1:
            entry["offsets"] = _sorted(entry["offsets"])
        step_totals = totals.get(name)
        if step_totals:
            entry["totals"] = _sorted(step_totals)
        started = fields.get(STARTED_PREFIX + name)
        moved = fields.get(MOVED_PREFIX + name)
        end = fields.get(ENDED_PREFIX + name) if entry["state"] in FINAL_STEP_STATES else None
        entry["progress"] = progress(entry["offsets"], step_totals, started, moved,
                                     int(fields.get(RESUMED_PREFIX + name, 0)),
                                     int(end) if end else None)
        if entry["state"] != "running" or fields["state"] == "stop":
            # Time is left only to a step that runs: one that ended short of its totals
            # (failed, cut by its batch's stop, a success that skipped records) never moves
            # again, and a success has none left.
            entry["progress"]["eta_s"] = 0.0 if entry["state"] == "success" else None
        if running and entry["state"] == "running" and _stalled(moved or started):
            entry["stalled"] = stalled_any = True
    out: dict[str, Any] = {
        "id": fields["id"],
        "name": fields["name"],
        "deployment": fields["deployment"],
        "state": {"state": fields["state"], "steps": steps},
        "pipeline_id": fields["pipeline_id"],
        "pipeline_version": fields["pipeline_version"],
        "created_at": fields["created_at"],
        "updated_at": fields["updated_at"],
        "outcome": fields.get("outcome"),
        "reason": fields.get("reason"),
        "flow_run_id": fields.get("flow_run_id"),
    }
    # Beside the contract's fields, only where the batch has them.
    config = config_of(fields)
    if config is not None:
        out["config"] = config
    resumed_from = fields.get(RESUMED_FROM)
    if resumed_from is not None:
        out["resumed_from"] = resumed_from
    if stalled_any:
        out["stalled"] = True
    return out


def _sorted(by_partition: dict[str, int]) -> dict[str, int]:
    return {part: by_partition[part] for part in sorted(by_partition, key=_natural)}


def progress(offsets: Mapping[str, int], totals: Mapping[str, int] | None,
             started: str | None, moved: str | None, before: int = 0,
             ended_ms: int | None = None) -> dict[str, float | None]:
    """A step's `progress`: percent of its totals done (when it reported the total of
    every partition it reported), its rate in records per second, and the time left at that
    rate. The rate counts the records done since the step began running (`started`, the ts
    of its running event: see APPLY_EVENTS), not the `before` it had done then (a resumed
    step's), up to its end (`ended_ms`, the ts of its final state: the same clock, so a
    backlog applied long after tells the rate it ran at) or, while it runs, its last move
    (`moved`, when applied)."""
    done = sum(offsets.values())
    percent = eta = rate = None
    if started and (moved or ended_ms):
        if ended_ms:  # a guess of the reconciler's has 0: no end known
            elapsed = ended_ms / 1000 - _when(started).timestamp()
        else:
            elapsed = (_when(cast(str, moved)) - _when(started)).total_seconds()
        if elapsed > 0:
            rate = round(max(done - before, 0) / elapsed, 1)
    # Only when every partition has its total: over the others alone, a step that gave
    # some partitions none read 100.0 (eta 0) while it went on with them.
    if totals and totals.keys() >= offsets.keys():
        total = sum(totals.values())
        counted = sum(min(offsets.get(part, 0), of) for part, of in totals.items())
        if total > 0:
            # Rounded down: 9,996 of 10,000 records is 99.9, not a 100.0 that reads as done
            # while records are left; 100.0 is all of them.
            percent = 1000 * counted // total / 10
            if counted >= total:
                eta = 0.0
            elif rate:
                eta = round((total - counted) / rate, 1)
    return {"percent": percent, "records_per_s": rate, "eta_s": eta}


def _when(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def _stalled(since: str | None) -> bool:
    """A running step that has not moved for `DHUB_STALL_AFTER_S` (read when rendered: a
    cached render is re-read within the cache's TTL)."""
    if since is None:
        return False
    return (datetime.now(UTC) - _when(since)).total_seconds() > stall_after_s()


def stall_after_s() -> float:
    return get_settings().stall_after_s
