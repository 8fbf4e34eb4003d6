"""The index of batches that have a flow run and may not have stopped yet.

A sorted set, member `<pipeline_id>/<batch_id>`, score = when it was last checked. The
commands consumer adds a batch when it creates its flow run; the reconciler takes the
least recently checked ones each round and removes those that stopped or vanished. Its
size is the number of live runs, so a round costs nothing that grows with history. It is a
helper, not part of the projection: losing it only delays the detection of a lost event.
"""

from __future__ import annotations

import time
from typing import cast

from redis.asyncio import Redis

from core import keys


def member(pipeline_id: str, batch_id: str) -> str:
    return f"{pipeline_id}/{batch_id}"


def parse(value: str) -> tuple[str, str] | None:
    pipeline_id, sep, batch_id = value.partition("/")
    return (pipeline_id, batch_id) if sep and pipeline_id and batch_id else None


class ActiveRuns:
    def __init__(self, redis: Redis, key: str = keys.ACTIVE_RUNS) -> None:
        self._redis = redis
        self.key = key

    async def add(self, pipeline_id: str, batch_id: str) -> None:
        await self._redis.zadd(self.key, {member(pipeline_id, batch_id): time.time()})

    async def remove(self, pipeline_id: str, batch_id: str) -> None:
        await self._redis.zrem(self.key, member(pipeline_id, batch_id))

    async def due(self, limit: int) -> list[tuple[str, str]]:
        """The `limit` least recently checked batches, marked checked now."""
        values = cast(list[str], await self._redis.zrange(self.key, 0, limit - 1))
        if values:
            now = time.time()
            await self._redis.zadd(self.key, dict.fromkeys(values, now), xx=True)
        return [p for v in values if (p := parse(v)) is not None]
