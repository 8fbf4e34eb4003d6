"""`POST /api/v1/batches/{pipeline_id}/{batch_id}/resume` (issue 10, part 3): being built."""

from __future__ import annotations

from aiohttp import web


async def resume_batch(request: web.Request) -> web.Response:
    return web.json_response({"error": "resume is not implemented yet"}, status=501)
