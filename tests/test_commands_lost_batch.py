"""A run command whose batch Redis lost (an AOF that lost its last second, a restart
without persistence) while the consumers ran: the API had answered the POST, and the
commands consumer skipped the run as "gone" and committed it. The batch was lost for good
(a rebuild restored it `pending`, never to run, or, a retention later, not at all)."""

from __future__ import annotations

import time
from typing import Any, cast

from redis.asyncio import Redis

from consumers.plumbing.command_effects import CommandEffects
from core import keys
from core.codec import Run
from core.command_messages import Command, Recorded
from core.registry import PipelineRegistry
from core.scripts import Scripts
from core.store import BatchStore
from tests.helpers import spec

P = "p-lost"


def _effects(store: BatchStore, registry: PipelineRegistry) -> CommandEffects:
    missing = cast(Any, None)  # no Prefect, Kafka or clean-up is reached by the restore
    return CommandEffects(store, registry, *[missing] * 7)


def _run(batch_id: str, ts: float | None = None) -> Run:
    recorded = Recorded(seq=7, created_at="2026-12-03T10:00:00.000Z",
                        extra={"config": '{"extract":{"partitions":2}}'})
    return cast(Run, Command("run", batch_id, P, pipeline_version="1", recorded=recorded,
                             ts=ts if ts is not None else time.time()))


async def test_a_lost_batch_is_written_again_from_its_run_command(
        redis: Redis, scripts: Scripts) -> None:
    store = BatchStore(redis, scripts, token_secret=b"s")
    registry = PipelineRegistry(redis, scripts)
    await registry.register(P, spec())
    restored = await _effects(store, registry)._restored(_run("batch-lost"))
    assert restored is not None
    assert (restored["state"], restored["created_at"], restored["config"]) == (
        "pending", "2026-12-03T10:00:00.000Z", '{"extract":{"partitions":2}}')
    assert await redis.zscore(keys.batch_index(P), "batch-lost") is not None


async def test_a_batch_gone_on_purpose_is_not_written_again(
        redis: Redis, scripts: Scripts) -> None:
    store = BatchStore(redis, scripts, token_secret=b"s")
    registry = PipelineRegistry(redis, scripts)
    await registry.register(P, spec())
    effects = _effects(store, registry)
    # Purged (deleted, undone, removed by retention): its mark says so.
    await store.create(P, "batch-purged", spec())
    await store.purge(P, "batch-purged")
    assert await effects._restored(_run("batch-purged")) is None
    # Hidden (a DELETE under way, an abandoned POST): its hash is there.
    await store.create(P, "batch-hidden", spec())
    await store.hide(P, "batch-hidden")
    assert await effects._restored(_run("batch-hidden")) is None
    # A command older than the marks' day: the batch may be gone on purpose, unmarked now.
    assert await effects._restored(_run("batch-old", ts=time.time() - 2 * 86_400)) is None
    assert not await redis.exists(keys.batch(P, "batch-purged"), keys.batch(P, "batch-old"))
