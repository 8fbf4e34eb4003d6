"""The query parameters a route takes: one it does not take is refused, not ignored."""

from __future__ import annotations

from aiohttp import web

from service.errors import bad_request

# How much of an unknown query parameter's name a refusal quotes.
_NAME_SHOWN = 64


def refuse_unknown(request: web.Request, takes: tuple[str, ...], route: str,
                   hint: str = "") -> None:
    """A query parameter the route does not take is a 400 (with `hint` said after): ignored,
    a misspelt filter (`status=running`) or one it has not (`pipeline_version=1`, the POST's;
    the list's `state=running` on the latest batch) answered as if it had been applied. A
    name starting with `_` is a cache-buster (`_=1733234`) and still ignored: one must not
    break a call."""
    unknown = sorted({name for name in request.query
                      if name not in takes and not name.startswith("_")})
    if unknown:
        names = ", ".join(repr(name[:_NAME_SHOWN]) for name in unknown)
        raise bad_request(f"unknown query parameter {names}: {route} takes "
                          f"{', '.join(takes) or 'none'}{hint}")
