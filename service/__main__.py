"""`python -m service`: serve the API on DHUB_API_HOST:DHUB_API_PORT."""

from __future__ import annotations

import logging

from aiohttp import web

from core.settings import get_settings
from service.app import init_app


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = get_settings()
    web.run_app(init_app(settings), host=settings.api_host, port=settings.api_port,
                access_log=None, print=None)


if __name__ == "__main__":
    main()
