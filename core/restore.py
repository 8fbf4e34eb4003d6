"""Writing what the compacted topics hold back into Redis (the Redis half of a rebuild;
`consumers.rebuild` reads the topics).

Into an empty database, with no API and no consumer writing meanwhile: nothing here is
atomic across batches, and a consumer running against a half-rebuilt Redis would drop the
events of batches not restored yet (unknown batch) and commit past them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

from redis.asyncio import Redis

from core import keys
from core.paging import Pager
from core.registry import PipelineRegistry, Registered
from core.snapshots import PipelineVersion, Snapshot
from core.store import BatchStore

# Hashes written per round trip: big enough that the round trips vanish, small enough that
# one pipeline's reply stays a few MB.
CHUNK = 1000


@dataclass(slots=True)
class Restored:
    pipelines: int = 0
    versions: int = 0
    batches: int = 0
    hidden: int = 0
    conflicts: list[str] = field(default_factory=list)


async def restore_pipelines(registry: PipelineRegistry, versions: Iterable[PipelineVersion],
                            restored: Restored) -> None:
    """Registers each version in its pipeline's registration order (the last is latest)."""
    by_pipeline: dict[str, list[PipelineVersion]] = defaultdict(list)
    for version in versions:
        by_pipeline[version.pipeline_id].append(version)
    for pipeline_id, found in sorted(by_pipeline.items()):
        for version in sorted(found, key=lambda v: v.order):
            outcome = await registry.register(pipeline_id, version.spec)
            if outcome is Registered.CONFLICT:  # the database was not empty
                restored.conflicts.append(f"{pipeline_id}/{version.spec.version}")
            restored.versions += 1
        restored.pipelines += 1


async def restore_batches(redis: Redis, store: BatchStore, pager: Pager,
                          snapshots: Iterable[Snapshot], hidden: set[tuple[str, str]],
                          restored: Restored) -> None:
    """Each batch's hash exactly as snapshotted (its `seq`, `rev`, `created_at`,
    `updated_at` included), the batch index and the sequence counter (the highest `seq`, so
    new batches continue the order), then the list's other indexes by the store's own
    backfill. A batch deleted but not yet purged (`hidden`) is hidden again by the store."""
    by_pipeline: dict[str, list[Snapshot]] = defaultdict(list)
    for snap in snapshots:
        by_pipeline[snap.pipeline_id].append(snap)
    for pipeline_id, snaps in sorted(by_pipeline.items()):
        for start in range(0, len(snaps), CHUNK):
            async with redis.pipeline(transaction=False) as pipe:
                for snap in snaps[start:start + CHUNK]:
                    # As flat pairs: redis-py's `mapping` type takes no dict[str, str].
                    pairs = [x for item in snap.fields.items() for x in item]
                    pipe.hset(keys.batch(pipeline_id, snap.batch_id), items=pairs)
                    pipe.zadd(keys.batch_index(pipeline_id), {snap.batch_id: snap.seq})
                await pipe.execute()
        top = max(snap.seq for snap in snaps)
        current = int(cast(str | None, await redis.get(keys.batch_seq(pipeline_id))) or 0)
        if top > current:
            await redis.set(keys.batch_seq(pipeline_id), top)
        for snap in snaps:
            if (pipeline_id, snap.batch_id) in hidden:
                await store.hide(pipeline_id, snap.batch_id)
                restored.hidden += 1
        # The created and filter indexes from the hashes (hidden batches skipped), and the
        # marker that says they are complete.
        await pager.ensure_indexes(pipeline_id)
        restored.batches += len(snaps)
