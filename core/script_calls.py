"""Many calls of one registered script in one round trip, as the consumers' hot paths send
them (`BatchStore.apply`, `core.packer`)."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError


async def run_all(redis: Redis, script: AsyncScript, calls: list[list[Any]]) -> list[Any]:
    """Each call's reply, in order; `calls` hold EVALSHA's arguments after the sha (the
    number of keys, the keys, the arguments). Raises the first error as Redis sent it."""
    try:
        return await _evalsha_all(redis, script.sha, calls)
    except NoScriptError:
        # Redis lost its scripts (a restart, a failover): every call failed alike, so
        # none ran; load the script and send them again.
        await redis.script_load(script.script)
        return await _evalsha_all(redis, script.sha, calls)


async def _evalsha_all(redis: Redis, sha: str, calls: list[list[Any]]) -> list[Any]:
    """EVALSHA itself rather than the registered script's call, which would cost every
    pipeline a SCRIPT EXISTS round trip first."""
    async with redis.pipeline(transaction=False) as pipe:
        for args in calls:
            pipe.evalsha(sha, *args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
    # The first error as Redis sent it: the pipeline would prefix its text, and callers
    # read the code it starts with (BUSY, READONLY...: `core.retry.classify`).
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results
