"""The optional body of a run or a resume (`core.models.RunRequest`): per-step config
overrides. No body, an empty one, `{}` and `{"config": {}}` all mean "no overrides", so a
client that always sends JSON gets exactly what a bare POST gets.

A key given twice in one object of a body is refused (`refuse_duplicate_keys`, also for a
pipeline's definition): JSON parsers keep the last one and say nothing, which can hide an
invalid value behind a valid one."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

import orjson
from aiohttp import web
from pydantic import ValidationError

from core import layout
from core.models import PipelineSpec, RunRequest
from core.run_config import ConfigRefused, effective_config
from core.snapshots import RECORD_LIMIT
from service.errors import ApiError, bad_request

Overrides = dict[str, dict[str, Any]]

# What a run command takes beside the fields it carries for a rebuild: ids and a version
# (128 characters each at most), times, an Idempotency-Key's record (which shows a body of
# 512 characters at most). Generous: a few KB at most are used.
COMMAND_OVERHEAD: Final = 16 << 10


async def overrides_of(request: web.Request) -> Overrides:
    """The body's overrides; 400 for any other body."""
    if not request.body_exists:
        return {}
    raw = await request.read()
    if not raw.strip():
        return {}
    refuse_duplicate_keys(raw, "invalid run request")
    try:
        body = RunRequest.model_validate_json(raw)
    except ValidationError as exc:
        problems = [{"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]}
                    for e in exc.errors()]
        raise bad_request('invalid run request: the body is {"config": {"<step>": {...}}}',
                          problems=problems) from None
    return {step: dict(keys) for step, keys in body.config.items()}


def duplicate_key(raw: bytes) -> str | None:
    """A key given twice in one object of the JSON text `raw`, at any depth; None when there is
    none, or when `raw` is not JSON (the model's own parser then says why).

    Fast path: each colon of `raw` follows a key or is inside a string; the parsed tree,
    written back by orjson (which never escapes a colon), shows one colon per key it kept and
    every colon of its strings. So when `raw` has no more colons than that, no key was dropped
    as a duplicate (a dropped key takes its colon with it). All of it runs in C: about as
    cheap as the model's own parse. Only a body with a duplicate, or with a `\\u` escape (which
    may spell a colon the bytes do not show), is parsed again, with a hook seeing every key."""
    if b"\\u" not in raw:
        try:
            if raw.count(b":") <= orjson.dumps(orjson.loads(raw)).count(b":"):
                return None
        except (orjson.JSONDecodeError, orjson.JSONEncodeError):
            pass  # not JSON, or JSON orjson refuses (an integer over 64 bits, deep nesting)
    found: list[str] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) < len(pairs) and not found:  # some key twice: name the first repeated
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    found.append(key)
                    break
                seen.add(key)
        return obj

    try:
        json.loads(raw, object_pairs_hook=pairs_hook)
    except (ValueError, RecursionError):
        return None  # not JSON: refused by the model's parser, with its reason
    return found[0] if found else None


def refuse_duplicate_keys(raw: bytes, message: str) -> None:
    """400 (`message`, and the key) when a key is given twice in one object of `raw`."""
    key = duplicate_key(raw)
    if key is not None:
        raise bad_request(f"{message}: the key {key!r} is given more than once in one object",
                          duplicate_key=key)


def canonical(overrides: Overrides) -> str:
    """One text per meaning (keys sorted, no spaces, steps that override nothing left out):
    what an Idempotency-Key compares."""
    meant = {step: keys for step, keys in overrides.items() if keys}
    return orjson.dumps(meant, option=orjson.OPT_SORT_KEYS).decode() if meant else ""


def checked_config(spec: PipelineSpec, overrides: Overrides,
                   base: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """The effective config for `spec`; 400 with every problem (`problems`: loc, msg), 413
    when no run command could carry it."""
    try:
        config = effective_config(spec, overrides, base=base)
    except ConfigRefused as exc:
        raise bad_request("invalid run config", problems=exc.problems) from None
    refuse_unsendable({layout.CONFIG: orjson.dumps(config).decode()}, "the run's config")
    return config


def refuse_unsendable(fields: Mapping[str, str], what: str) -> None:
    """413 when a batch's run command could not carry `fields` (its hash's fields beyond a
    fresh batch's, which the command holds for a rebuild of Redis: JSON texts, quoted again,
    so each quote mark of a config takes four bytes there) in one Kafka record. Kafka refuses
    such a record on every try: sent, it would answer 503 "retry later" for ever."""
    size = len(orjson.dumps(fields)) + COMMAND_OVERHEAD  # msgspec quotes a str as orjson does
    if size > RECORD_LIMIT:
        raise ApiError(413, "payload_too_large",
                       f"{what} would make the batch's run command about {size:,} bytes; at "
                       f"most {RECORD_LIMIT:,} fit in one Kafka record")
