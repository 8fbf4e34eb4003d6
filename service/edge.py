"""Serving the app so that even errors found before routing are answered in the JSON shape.

aiohttp's HTTP parser refuses an oversize request line, an oversize header or a malformed
request before any handler runs, and its protocol answers those (and errors escaping the
handlers' edge, service.errors) as plain text. `ApiRunner` serves the app with a protocol
whose `handle_error` answers with `service.errors.error_response` instead. `python -m service`
should serve with `serve()`; tests start an `ApiRunner` on a free port.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from service.appkeys import REQUEST_STATS
from service.errors import Observe, code_for, error_response, new_request_id

# What a request target can start with (origin, absolute or asterisk form); a header name cannot
# start with '/' or a scheme followed by "://", so a too-long line starting so is the request line.
_TARGET_STARTS = (b"/", b"http://", b"https://")
# The request metrics' route and method for what the parser refused (its method may be
# anything a client sent: not a label value).
REFUSED_ROUTE = "refused"
REFUSED_METHOD = "-"


def _describe(status: int, exc: BaseException | None) -> tuple[int, str]:
    if isinstance(exc, LineTooLong):
        line = exc.args[0] if exc.args else b""
        if isinstance(line, bytes | bytearray) and bytes(line).startswith(_TARGET_STARTS):
            return 414, "the request line is longer than the server accepts"
        return 431, "a header is longer than the server accepts"
    if isinstance(exc, BadHttpMessage):
        return 400, "malformed HTTP request"
    if status >= 500:
        return status, "unexpected error; quote the request id"
    return status, "the request could not be handled"


class JsonErrorProtocol(RequestHandler):
    """aiohttp's per-connection protocol, answering its own errors as JSON."""

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError) and status < 500:
            # The client's fault: one line, and never the parser's message, which quotes the
            # offending bytes (an oversize Authorization header would put a token in the log).
            self.logger.info("refused a malformed request from %s: %s", request.remote,
                             type(exc).__name__)
            if request.writer.output_size > 0:
                raise ConnectionError("a response has begun; cannot send the error")
        else:
            # The parent logs with the traceback and refuses when a response has begun.
            super().handle_error(request, status, exc, message)
        status, text = _describe(status, exc)
        response = error_response(status, code_for(status), text, new_request_id())
        response.force_close()
        manager = self._manager
        if isinstance(manager, _JsonErrorServer) and manager.observe is not None:
            # Refused before any route: the edge never saw it, and a client failing on
            # every request (a header over the limit) would show no request at all.
            manager.observe(REFUSED_ROUTE, REFUSED_METHOD, status, 0.0)
        return response


class _JsonErrorServer(web.Server):
    observe: Observe | None = None

    def __call__(self) -> RequestHandler:
        return JsonErrorProtocol(self, loop=self._loop, **self._kwargs)


class ApiRunner(web.AppRunner):
    """An `AppRunner` whose connections use `JsonErrorProtocol`."""

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        server = _JsonErrorServer(plain.request_handler, request_factory=plain.request_factory,
                                  handler_cancellation=plain.handler_cancellation,
                                  loop=plain._loop, **plain._kwargs)
        stats = self.app.get(REQUEST_STATS)
        server.observe = stats.observe if stats is not None else None
        return server


async def serve(app: web.Application, host: str, port: int, **runner_args: Any) -> None:
    """Serves `app` until SIGINT or SIGTERM, then closes its connections and clients.

    `python -m service` runs `asyncio.run(serve(init_app(settings), host, port))`."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = ApiRunner(app, **runner_args)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
