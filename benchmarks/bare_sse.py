"""The live benchmark's anchor: a bare aiohttp Server-Sent Events fan-out, same framework.

`python -m benchmarks.bare_sse PORT FILE`: `GET /stream` sends FILE's bytes as one event,
then every body POSTed to `/push` to every open stream (no Redis, no auth, no cache): what
aiohttp itself costs to push one change to N clients.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from aiohttp import web

CLIENTS = web.AppKey("clients", set[asyncio.Queue[bytes]])


async def stream(request: web.Request) -> web.StreamResponse:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    request.app[CLIENTS].add(queue)
    try:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"event: batch\ndata: " + request.app[BODY] + b"\n\n")
        while True:
            body = await queue.get()
            await response.write(b"event: batch\ndata: " + body + b"\n\n")
    except ConnectionError:
        return response
    finally:
        request.app[CLIENTS].discard(queue)


async def push(request: web.Request) -> web.Response:
    body = await request.read()
    for queue in request.app[CLIENTS]:
        queue.put_nowait(body)
    return web.Response(text="ok")


async def ready(request: web.Request) -> web.Response:
    return web.Response(text="ok")


BODY = web.AppKey("body", bytes)


def main() -> None:
    port, body = int(sys.argv[1]), Path(sys.argv[2]).read_bytes()
    app = web.Application()
    app[BODY] = body
    app[CLIENTS] = set()
    app.router.add_get("/stream", stream)
    app.router.add_post("/push", push)
    app.router.add_get("/healthz", ready)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
