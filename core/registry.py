"""The pipeline registry in Redis: immutable versions of each pipeline's definition."""

from __future__ import annotations

import enum
from typing import cast

import orjson
from redis.asyncio import Redis

from core import keys
from core.models import PipelineSpec
from core.scripts import Scripts


class Registered(enum.Enum):
    CREATED = 1
    UNCHANGED = 0
    CONFLICT = -1
    MOVED = -2  # not added: not at the place asked for (`register`'s `at`)


def registered_body(spec: PipelineSpec) -> bytes:
    """A version's definition as the registry holds and compares it: a version registered
    again is unchanged only with this same text (`800` and `800.0`, equal to Python, are
    two definitions here)."""
    return orjson.dumps(spec.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)


class PipelineRegistry:
    def __init__(self, redis: Redis, scripts: Scripts) -> None:
        self.redis = redis
        self.scripts = scripts

    async def register(self, pipeline_id: str, spec: PipelineSpec,
                       at: int | None = None) -> Registered:
        """`at`: added only as the pipeline's version number `at` (0-based), so a version
        recorded when it would have been the latest never comes after ones registered since."""
        body = registered_body(spec)
        outcome = Registered(
            int(
                await self.scripts.register_pipeline(
                    keys=[keys.pipeline_versions(pipeline_id), keys.pipeline_order(pipeline_id)],
                    args=[spec.version, body, *([] if at is None else [at])],
                )
            )
        )
        if outcome in (Registered.CREATED, Registered.UNCHANGED):
            # Outside the script: the global set lives in another cluster slot. On an
            # unchanged version too: a retry adds what a first attempt that lost its
            # connection after the script did not (idempotent).
            await self.redis.sadd(keys.PIPELINES, pipeline_id)
        return outcome

    async def latest_version(self, pipeline_id: str) -> str | None:
        return cast(str | None, await self.redis.lindex(keys.pipeline_order(pipeline_id), -1))

    async def get(self, pipeline_id: str, version: str | None = None) -> PipelineSpec | None:
        """One version (default: the latest registered), or None when unknown."""
        if version is None:
            version = await self.latest_version(pipeline_id)
            if version is None:
                return None
        body = cast(str | None, await self.redis.hget(keys.pipeline_versions(pipeline_id), version))
        return PipelineSpec.model_validate_json(body) if body else None

    async def get_text(self, pipeline_id: str, version: str) -> str | None:
        """One version's definition as the registry holds it (`registered_body`'s text)."""
        return cast(str | None,
                    await self.redis.hget(keys.pipeline_versions(pipeline_id), version))

    async def versions(self, pipeline_id: str) -> list[PipelineSpec]:
        """Every version in registration order (the last is the latest)."""
        order = cast(list[str], await self.redis.lrange(keys.pipeline_order(pipeline_id), 0, -1))
        if not order:
            return []
        bodies = cast(list[str | None],
                      await self.redis.hmget(keys.pipeline_versions(pipeline_id), order))
        return [PipelineSpec.model_validate_json(b) for b in bodies if b]

    async def ids(self) -> list[str]:
        members = cast(set[str], await self.redis.smembers(keys.PIPELINES))
        return sorted(members)
