"""`python -m service`: serve the API on DHUB_API_HOST:DHUB_API_PORT until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio

from core import logs
from core.settings import get_settings
from service.app import init_app
from service.edge import serve
from service.request_log import RequestContext


def main() -> None:
    # JSON lines like the consumers', each with the request, pipeline and batch it concerns.
    logs.setup("INFO", RequestContext())
    settings = get_settings()
    # Through service.edge: the HTTP parser's own errors (oversize line or header) are JSON too.
    asyncio.run(serve(init_app(settings), settings.api_host, settings.api_port, access_log=None))


if __name__ == "__main__":
    main()
