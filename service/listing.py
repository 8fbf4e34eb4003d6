"""The paged list of a pipeline's batches (`GET /api/v1/batches/{pipeline_id}/`): newest
first, a signed token for the next page, or a push stream of the pipeline's changes."""

from __future__ import annotations

from aiohttp import web

from core.store import BadToken
from service import auth, streams
from service.appkeys import STORE
from service.batches import json_obj, path_id
from service.errors import bad_request

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    # ASCII only: str.isdigit() accepts '²' and other digits int() refuses.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 4) or not 1 <= int(raw) <= MAX_LIMIT:
        raise bad_request(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)


async def list_batches(request: web.Request) -> web.StreamResponse:
    auth.require(request, auth.READ)
    pipeline_id = path_id(request, "pipeline_id")
    limit = _limit(request)
    if streams.wants_stream(request):
        return await streams.stream_pipeline(request, pipeline_id, limit)
    token = request.query.get("token") or None
    try:
        page = await request.app[STORE].page(pipeline_id, limit, token)
    except BadToken as exc:
        raise bad_request(f"invalid token: {exc}") from None
    return json_obj({"items": page.items, "token": page.token})
