"""The paged list of a pipeline's batches (`GET /api/v1/batches/{pipeline_id}/`): newest
first, optionally filtered (`state`, `outcome`, `created_after`, `created_before`: see
`core.list_filter`), a signed token for the next page bound to the filter, or a push stream of the
pipeline's changes (unfiltered: a filter with `Accept: text/event-stream` is refused). A query
parameter it does not take is refused too (`service.query_params`), but for a cache-buster.

A pipeline never registered and without a batch is a 404, as its latest batch is; an empty
first page is what asks (`core.paging.pipeline_known`), so a listed pipeline pays nothing."""

from __future__ import annotations

from aiohttp import web

from core.list_filter import FILTERS, BadFilter, ListFilter
from core.paging import BadToken, pipeline_known
from service import pipeline_stream, query_params, streams
from service.appkeys import STORE
from service.batches import json_obj, path_id
from service.errors import bad_request, not_found

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
PARAMETERS = ("limit", "token", *FILTERS)


def _once(request: web.Request, name: str) -> str | None:
    """The query parameter `name`, refused when given twice: which one was meant is not
    ours to guess (`limit=1&limit=1000` taken as 1 pages one at a time)."""
    given = request.query.getall(name, [])
    if len(given) > 1:
        raise bad_request(f"{name} is given more than once")
    return given[0] if given else None


def _limit(request: web.Request) -> int:
    raw = _once(request, "limit")
    if raw is None:
        return DEFAULT_LIMIT
    # ASCII only: str.isdigit() accepts '²' and other digits int() refuses.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 4) or not 1 <= int(raw) <= MAX_LIMIT:
        raise bad_request(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)


def _filter(request: web.Request) -> ListFilter:
    values: dict[str, str] = {}
    for name in FILTERS:
        if (value := _once(request, name)) is not None:
            values[name] = value
    try:
        return ListFilter.parse(**values)
    except BadFilter as exc:
        raise bad_request(str(exc)) from None


async def list_batches(request: web.Request) -> web.StreamResponse:
    pipeline_id = path_id(request, "pipeline_id")
    query_params.refuse_unknown(request, PARAMETERS, "the list")
    limit = _limit(request)
    where = _filter(request)
    token = _once(request, "token")
    if token == "":
        # Not the first page: a client sending its last page's null token so would be given
        # the first page again as the next one, and list for ever.
        raise bad_request("empty token: leave token out for the first page")
    if streams.wants_stream(request):
        # The stream carries every change of the pipeline; filtering it is the client's.
        if where.active:
            raise bad_request("the push stream is not filtered: send state, outcome, "
                              "created_after and created_before without Accept: text/event-stream")
        # It starts at the first page: a token (any, valid or not) would be ignored, and a
        # client paging with it would get the first page again as if it were the next.
        if token is not None:
            raise bad_request("the push stream starts at the newest batches: send no token")
        return await pipeline_stream.stream_pipeline(request, pipeline_id, limit)
    store = request.app[STORE]
    try:
        page = await store.page(pipeline_id, limit, token, where)
    except BadToken as exc:
        raise bad_request(f"invalid token: {exc}") from None
    # A token's page is of a pipeline that had batches (the token is ours, signed for it).
    if not page.items and token is None and not await pipeline_known(store.redis, pipeline_id):
        raise not_found(f"unknown pipeline {pipeline_id}")
    return json_obj({"items": page.items, "token": page.token})
