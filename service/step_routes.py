"""`GET /api/v1/steps` (issue 10, part 2): being built."""

from __future__ import annotations

from aiohttp import web


async def list_steps(request: web.Request) -> web.Response:
    return web.json_response({"error": "the step list is not implemented yet"}, status=501)
