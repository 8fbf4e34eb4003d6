"""Small clients the parts' readiness checks and set-up hooks share: HTTP, Redis, a coroutine
run from sync code, a config file written only when it changed."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from deploy.local.config import StackConfig

T = TypeVar("T")
# Local URLs only: an http_proxy in the environment must not be asked for 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(url: str, body: Any = None, *, method: str | None = None,
         headers: dict[str, str] | None = None, timeout: float = 3) -> tuple[int, bytes]:
    """(status, body) of a request with a JSON body; an HTTP error status is an answer too."""
    data = None if body is None else json.dumps(body).encode()
    head = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data, head, method=method)  # noqa: S310
    try:
        with _OPENER.open(req, timeout=timeout) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def run_async(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion, also when called from async code (e.g. an async test)."""

    async def main() -> T:
        return await make()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    with ThreadPoolExecutor(1) as pool:  # a running loop cannot nest asyncio.run
        return pool.submit(asyncio.run, main()).result()


def redis_client(config: StackConfig) -> Any:
    """A short-lived client: use it in a `with` block so its connection is closed."""
    import redis  # imported on use: `status` of the other parts need not load it

    return redis.Redis.from_url(config.settings.redis_url, socket_timeout=2, socket_connect_timeout=1)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path
