"""A finished batch's hash in its packed form (issue 12: a finished batch in at most 1 KB).

A stopped batch's ~70 fields (offsets and totals per step and partition, step states and
times, config...) cost Redis ~2.7 KB as a listpack; packed they cost ~400 B. `pack` keeps
`PLAIN` fields as they are (the ones the Lua scripts read of a stopped batch: its id, state,
outcome, list order and times, `rev`, `stop_ts`, `deleted`) and puts every other field in one
text field, `packed`: a version prefix (`z1:`) then base64 of zlib (level 9, preset
dictionary `_ZDICT`) of a structural JSON of those fields (partition names once a step,
offsets as their distance to the step's totals, step times as milliseconds after
`created_at`, config and steps as JSON values): small because a finished batch is mostly
repetition. Text, not bytes: every client reads with decode_responses=True. The prefix lets
another dictionary or layout come later beside this one.

Every Python reader of a batch hash passes what it read through `unpacked` (the identity on
an unpacked hash), so the packed form stays this module's business; `core.store` packs a
batch once it stopped and unpacks it (script `core.pack_scripts.UNPACK`) before applying an
event to it.
"""

from __future__ import annotations

import binascii
import zlib
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Final

import orjson

from core.layout import DELETED
from core.models import deployment_name
from core.packed_values import iso_at, json_value, ms_of, number, time_after

# The field holding the packed rest of a finished batch's hash.
PACKED: Final = "packed"
# The fields a packed hash keeps as they are (the contract with the Lua scripts: they read
# only these of a stopped batch). A field written plainly beside `packed` wins over a packed
# copy of it (`unpacked`).
PLAIN: Final = frozenset({"id", "state", "outcome", "seq", "rev", "created_at", "updated_at",
                          "stop_ts", "deleted"})
VERSION: Final = "z1:"

# The preset dictionary of version z1 (never change it: packed hashes in Redis and in the
# snapshots topic decode with it; a new one is a new version). The words of finished batches
# (states, outcomes, the demo pipelines' step, partition and config names), then the
# structural JSON (`_encode` below) of a typical finished batch of the demo sales pipeline:
# zlib finds most of a small batch's text in it. Nothing of one batch in particular (ids,
# flow run ids, times), so the benchmark's batch gains no more from it than a real one.
_ZDICT: Final = (
    b'"Failed","Crashed","Cancelled","failed","crashed","cancelled","pending","scheduled",'
    b'"running","none","run-pipeline/","part-0","part-1","part-2","generate","count","merge",'
    b'"lines":3000,"words_per_line":5,"fail_at":null,"invalid_rate":0.02,"partitions":3,'
    b'"rows":6001,"seed":42,"throttle":null[["extract","transform","load"],"sales",0,0,"1",'
    b'"","Completed",{"extract":{"fail_at":null,"invalid_rate":0.02,"partitions":3,'
    b'"rows":6001,"seed":42,"throttle":null},"transform":{"fail_at":null,"invalid_rate":0.02,'
    b'"partitions":3,"rows":6001,"seed":42,"throttle":null},"load":{"fail_at":null,'
    b'"invalid_rate":0.02,"partitions":3,"rows":6001,"seed":42,"throttle":null}},null,'
    b'[["success",1021,3042,null,0,[0,0,0],[6001,6001,6001]],["success",3043,5084,null,0,'
    b'[0,0,0],[6001,6001,6001]],["success",5085,7126,null,0,[0,0,0,0,0,0,0,0],[]]],'
    b'[["partition_0","partition_1","partition_2","partition_3","partition_4","partition_5",'
    b'"partition_6","partition_7"]],{}]'
)
_LEVEL: Final = 9

# The per-step fields packed in fixed places: `<head>:<step>` (core.layout's names).
_STEP_HEADS: Final = frozenset({"step", "started", "moved", "resumed"})
# The batch's own fields packed in fixed places (positions 1.. of the encoding).
_SCALARS: Final = ("name", "deployment", "pipeline_id", "pipeline_version", "flow_run_id",
                   "reason", "config", "resumed_from")


def packable(fields: Mapping[str, str]) -> bool:
    """A hash that is held packed and is not yet: a stopped batch, not hidden (a hidden one
    is the delete's to purge; its `deleted` is read by scripts)."""
    return fields.get("state") == "stop" and DELETED not in fields and PACKED not in fields


def pack(fields: Mapping[str, str]) -> dict[str, str]:
    """The packed form of a batch hash: its `PLAIN` fields and `packed` (the rest)."""
    if PACKED in fields:
        raise ValueError("the batch hash is packed already")
    plain = {name: value for name, value in fields.items() if name in PLAIN}
    rest = {name: value for name, value in fields.items() if name not in PLAIN}
    body = orjson.dumps(_encode(rest, ms_of(fields.get("created_at"))))
    compressor = zlib.compressobj(_LEVEL, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, _ZDICT)
    raw = compressor.compress(body) + compressor.flush()
    plain[PACKED] = VERSION + binascii.b2a_base64(raw, newline=False).decode()
    return plain


def unpacked(fields: dict[str, str]) -> dict[str, str]:
    """The hash as its readers know it, whether Redis holds it packed or not."""
    packed = fields.get(PACKED)
    if packed is None:
        return fields
    if not packed.startswith(VERSION):
        raise ValueError(f"packed batch hash of an unknown version: {packed[:8]!r}")
    decompressor = zlib.decompressobj(-15, _ZDICT)
    body = decompressor.decompress(binascii.a2b_base64(packed[len(VERSION):]))
    out = _decode(orjson.loads(body), ms_of(fields.get("created_at")))
    for name, value in fields.items():
        if name != PACKED:
            out[name] = value
    return out


# -- the structural encoding ---------------------------------------------------------------
# [steps, name, deployment, pipeline_id, pipeline_version, flow_run_id, reason, config,
#  resumed_from, per step [state, started, moved, resumed, partition list, offsets, totals],
#  partition lists, every other field as it is]
# null: the field is absent (a value is never null: hash values are strings). `steps` and
# `config`: their JSON value when it writes back exactly, else the string. `deployment` 0:
# the pipeline's usual deployment name; `pipeline_id` 0: the same as `name`.


def _encode(rest: dict[str, str], base_ms: int | None) -> list[Any]:
    raw_steps = rest.pop("steps", None)
    steps_value: Any = raw_steps
    names: list[str] = []
    if raw_steps is not None:
        parsed = json_value(raw_steps)
        if isinstance(parsed, list) and all(isinstance(s, str) for s in parsed):
            steps_value = parsed
            names = list(dict.fromkeys(parsed))
    per_step: dict[str, dict[str, str]] = {name: {} for name in names}
    offsets: dict[str, dict[str, str]] = {name: {} for name in names}
    totals: dict[str, dict[str, str]] = {name: {} for name in names}
    other: dict[str, str] = {}
    scalars: dict[str, str] = {}
    tables = (offsets, totals, per_step)
    for field, value in rest.items():
        filed = _FILED.get(field)
        if filed is None:
            filed = _filing(field)
            if len(_FILED) < _FILED_MAX:
                _FILED[field] = filed
        kind, step, key = filed
        if kind == _SCALAR:
            scalars[key] = value
            continue
        if kind != _ELSE:
            into = tables[kind].get(step)
            if into is not None:
                into[key] = value
                continue
        other[field] = value
    name = scalars.get("name")
    deployment: str | int | None = scalars.get("deployment")
    if name is not None and deployment == deployment_name(name):
        deployment = 0
    pipeline_id: str | int | None = scalars.get("pipeline_id")
    if name is not None and pipeline_id == name:
        pipeline_id = 0
    config: Any = scalars.get("config")
    if config is not None:
        config = json_value(config, keep_strings=True)
    lists: list[list[str]] = []
    where: dict[tuple[str, ...], int] = {}
    steps_out: list[list[Any]] = []
    for step in names:
        mine = per_step[step]
        offs, tots = offsets[step], totals[step]
        partitions = tuple(sorted(offs.keys() | tots.keys()))
        n = where.get(partitions)
        if n is None:
            n = where[partitions] = len(lists)
            lists.append(list(partitions))
        tot_out: list[Any] = []
        off_out: list[Any] = []
        for p in partitions:
            tot_text, off_text = tots.get(p), offs.get(p)
            total = number(tot_text)
            if type(total) is int:
                # A finished step's offsets are its totals: zeros.
                off = 0 if off_text == tot_text else number(off_text)
                if type(off) is int and off_text != tot_text:
                    off = total - off
            else:
                off = number(off_text)
            tot_out.append(total)
            off_out.append(off)
        steps_out.append([mine.get("step"), time_after(mine.get("started"), base_ms),
                          time_after(mine.get("moved"), base_ms), number(mine.get("resumed")),
                          n, off_out, tot_out])
    return [steps_value, name, deployment, pipeline_id, scalars.get("pipeline_version"),
            scalars.get("flow_run_id"), scalars.get("reason"), config,
            # Sorted: the same hash packs to the same text whatever order HGETALL gave.
            scalars.get("resumed_from"), steps_out, lists, dict(sorted(other.items()))]


# Where `_encode` files a field: (kind, step, key) with kind an index into its (offsets,
# totals, per step) tables, or a scalar, or else. Remembered per field name: a pipeline's
# batches share theirs, and a look-up costs less than taking the name apart again.
_OFFSET, _TOTAL, _PER_STEP, _SCALAR, _ELSE = 0, 1, 2, 3, 4
_FILED: dict[str, tuple[int, str, str]] = {}
_FILED_MAX: Final = 100_000


def _filing(field: str) -> tuple[int, str, str]:
    head, sep, tail = field.partition(":")
    if sep:
        if head == "off" or head == "tot":
            step, sep, part = tail.partition(":")
            if sep:
                return (_OFFSET if head == "off" else _TOTAL, step, part)
        elif head in _STEP_HEADS:
            return (_PER_STEP, tail, head)
    elif field in _SCALARS:
        return (_SCALAR, "", field)
    return (_ELSE, "", "")


def _decode(data: list[Any], base_ms: int | None) -> dict[str, str]:
    (steps_value, name, deployment, pipeline_id, version, flow_run_id, reason, config,
     resumed_from, steps_out, lists, other) = data
    out: dict[str, str] = {}
    names: list[str] = []
    if isinstance(steps_value, list):
        out["steps"] = orjson.dumps(steps_value).decode()
        names = list(dict.fromkeys(steps_value))
    elif steps_value is not None:
        out["steps"] = steps_value
    if deployment == 0:
        deployment = deployment_name(name)
    if pipeline_id == 0:
        pipeline_id = name
    if config is not None and not isinstance(config, str):
        config = orjson.dumps(config).decode()
    for field, value in zip(_SCALARS, (name, deployment, pipeline_id, version, flow_run_id,
                                       reason, config, resumed_from), strict=True):
        if value is not None:
            out[field] = value
    for step, (state, started, moved, resumed, n, off_out, tot_out) in zip(
            names, steps_out, strict=True):
        if state is not None:
            out["step:" + step] = state
        if started is not None:
            out["started:" + step] = iso_at(started, base_ms)
        if moved is not None:
            out["moved:" + step] = iso_at(moved, base_ms)
        if resumed is not None:
            out["resumed:" + step] = str(resumed)
        off_names, tot_names = _partition_fields(step, tuple(lists[n]))
        for off_name, tot_name, off, total in zip(off_names, tot_names, off_out, tot_out,
                                                 strict=True):
            if type(total) is int:
                text = out[tot_name] = str(total)
                if type(off) is int:
                    out[off_name] = text if off == 0 else str(total - off)
                    continue
            elif total is not None:
                out[tot_name] = total
            if off is not None:
                out[off_name] = str(off)
    out.update(other)
    return out


@lru_cache(maxsize=1024)
def _partition_fields(step: str, partitions: tuple[str, ...]
                      ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A step's offset and total field names (every read of a packed batch builds them)."""
    return (tuple(f"off:{step}:{p}" for p in partitions),
            tuple(f"tot:{step}:{p}" for p in partitions))
