"""The optional body of a run or a resume (`core.models.RunRequest`): per-step config
overrides. No body, an empty one, `{}` and `{"config": {}}` all mean "no overrides", so a
client that always sends JSON gets exactly what a bare POST gets."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from core.models import PipelineSpec, RunRequest
from core.run_config import ConfigRefused, effective_config
from service.errors import bad_request

Overrides = dict[str, dict[str, Any]]


async def overrides_of(request: web.Request) -> Overrides:
    """The body's overrides; 400 for any other body."""
    if not request.body_exists:
        return {}
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = RunRequest.model_validate_json(raw)
    except ValidationError as exc:
        problems = [{"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]}
                    for e in exc.errors()]
        raise bad_request('invalid run request: the body is {"config": {"<step>": {...}}}',
                          problems=problems) from None
    return {step: dict(keys) for step, keys in body.config.items()}


def canonical(overrides: Overrides) -> str:
    """One text per meaning (keys sorted, no spaces, steps that override nothing left out):
    what an Idempotency-Key compares."""
    meant = {step: keys for step, keys in overrides.items() if keys}
    return orjson.dumps(meant, option=orjson.OPT_SORT_KEYS).decode() if meant else ""


def checked_config(spec: PipelineSpec, overrides: Overrides,
                   base: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """The effective config for `spec`; 400 with every problem (`problems`: loc, msg)."""
    try:
        return effective_config(spec, overrides, base=base)
    except ConfigRefused as exc:
        raise bad_request("invalid run config", problems=exc.problems) from None
