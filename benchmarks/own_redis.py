"""A redis-server of a benchmark's own (bench-rebuild, bench-storage): nothing else writes to
it, so its memory and its CPU are what the benchmark measures alone."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import RedisError


@contextlib.asynccontextmanager
async def own_redis(port: int, config: Mapping[str, str] | None = None,
                    prefix: str = "dhub-bench-") -> AsyncIterator[str]:
    """Its URL once it answers PING; `config`: more server settings (name -> value)."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    extra = [arg for name, value in (config or {}).items() for arg in (f"--{name}", value)]
    proc = await asyncio.create_subprocess_exec(
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
        "--save", "", "--appendonly", "no", *extra, stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = Redis.from_url(url)
        try:
            async with asyncio.timeout(10):
                while True:
                    with contextlib.suppress(OSError, RedisError):
                        if await client.ping():
                            break
                    await asyncio.sleep(0.05)
        finally:
            await client.aclose()
        yield url
    finally:
        proc.terminate()
        async with asyncio.timeout(10):
            await proc.wait()
        shutil.rmtree(directory, ignore_errors=True)
