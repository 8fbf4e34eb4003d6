"""`/ui/`: the live web page, static files shipped inside the package (`service/ui/`).

No build step: plain HTML, CSS and JavaScript. The files are read once, at first use, into a
table keyed by their names, and a request is answered only from that table, so no request
path ever reaches the file system (`..`, absolute paths, symlinks: all simply unknown
names). Every answer has a strong ETag; `Cache-Control: no-cache` makes the browser revalidate
(a 304 when nothing changed), so a new release is seen on the next load without hashed names.

The page needs no token to load (paths outside /api/v1/ are public, service.auth): its data
calls carry the bearer token, and the Content-Security-Policy lets it talk only to this origin
and run only its own scripts: `app.js` and the ES modules it imports, all files of this same
directory (`script-src 'self'` covers a module's imports as well as the page's tag).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Final, NamedTuple

from aiohttp import web

from service.conditional import matches
from service.errors import not_found

DIRECTORY: Final = Path(__file__).with_name("ui")
INDEX: Final = "index.html"
# A browser runs a module only if it comes with a JavaScript type (nosniff holds classic
# scripts to the same): the modules are named `.js`, as a `.mjs` would not be served at all.
CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
HEADERS: Final = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
}


class Asset(NamedTuple):
    body: bytes
    content_type: str
    etag: str


@functools.cache
def assets() -> dict[str, Asset]:
    """Every servable file by name: the directory's files of a known type, nothing nested."""
    table: dict[str, Asset] = {}
    for path in sorted(DIRECTORY.iterdir()):
        content_type = CONTENT_TYPES.get(path.suffix)
        if content_type is None or not path.is_file():
            continue
        body = path.read_bytes()
        table[path.name] = Asset(body, content_type,
                                 '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"')
    return table


async def page(request: web.Request) -> web.Response:
    """`GET /ui/` and `GET /ui` (the page; it names its files by absolute paths, so both
    work) and `GET /ui/{name}` (its script modules and style sheet)."""
    name = request.match_info.get("name", INDEX)
    asset = assets().get(name)
    if asset is None:
        raise not_found("no such file of the web page")
    headers = {**HEADERS, "ETag": asset.etag}
    if matches(request.headers.get("If-None-Match", ""), asset.etag):
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, headers={**headers, "Content-Type": asset.content_type})
