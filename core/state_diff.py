"""How a rebuilt Redis differs from another (the live one): the check behind a dry run,
`python -m consumers.rebuild --redis-url <empty db> --compare-with <live db>`.

Compared: every pipeline's versions in order, every listed batch's hash apart from the
dedup state a snapshot does not carry (`core.snapshots.NOT_SNAPSHOTTED`), each as its
readers see it (`core.packing.unpacked`: a finished batch packed on one side only is equal),
whether the rebuilt one lists it too, and the batches each of the list's filter indexes
(state, outcome) holds once the live one has built them: a hash no list reaches is not there
for GET's list or its filters.
On a stack that keeps running, batches changed since the snapshots were read differ: compare
a quiet one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from redis.asyncio import Redis

from core import keys
from core.packing import unpacked
from core.registry import PipelineRegistry
from core.scripts import Scripts
from core.snapshots import NOT_SNAPSHOTTED

CHUNK = 1000


@dataclass(slots=True)
class StateDiff:
    batches: int = 0  # compared (listed in the source)
    missing: list[str] = field(default_factory=list)  # in the source, not in the rebuilt one
    extra: list[str] = field(default_factory=list)  # listed only in the rebuilt one
    differing: list[str] = field(default_factory=list)  # "<pipeline>/<batch>: fields"
    pipelines: list[str] = field(default_factory=list)  # pipelines whose versions differ

    @property
    def equal(self) -> bool:
        return not (self.missing or self.extra or self.differing or self.pipelines)


async def _listed(redis: Redis, pipeline_id: str) -> list[str]:
    return cast(list[str], await redis.zrange(keys.batch_index(pipeline_id), 0, -1))


def _index_names(pipeline_id: str) -> list[tuple[str, str]]:
    """(key, name as reported: `state:pending`, `outcome:failed`) of the filter indexes."""
    return [(key, key.rsplit(":batches:", 1)[1])
            for key in keys.batch_filter_indexes(pipeline_id)]


async def _members(redis: Redis, key: str) -> set[str]:
    return set(cast(list[str], await redis.zrange(key, 0, -1)))


async def _hashes(redis: Redis, pipeline_id: str, ids: list[str]) -> list[dict[str, str]]:
    async with redis.pipeline(transaction=False) as pipe:
        for batch_id in ids:
            pipe.hgetall(keys.batch(pipeline_id, batch_id))
        return [unpacked(h) for h in cast(list[dict[str, str]], await pipe.execute())]


async def compare(source: Redis, rebuilt: Redis) -> StateDiff:
    diff = StateDiff()
    old, new = (PipelineRegistry(r, Scripts(r)) for r in (source, rebuilt))
    for pipeline_id in sorted(set(await old.ids()) | set(await new.ids())):
        if await old.versions(pipeline_id) != await new.versions(pipeline_id):
            diff.pipelines.append(pipeline_id)
        ids, rebuilt_ids = await _listed(source, pipeline_id), await _listed(rebuilt, pipeline_id)
        listed = set(rebuilt_ids)
        diff.extra += [f"{pipeline_id}/{b}" for b in sorted(listed - set(ids))]
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start:start + CHUNK]
            pairs = zip(await _hashes(source, pipeline_id, chunk),
                        await _hashes(rebuilt, pipeline_id, chunk), strict=True)
            for batch_id, (was, now) in zip(chunk, pairs, strict=True):
                diff.batches += 1
                if not now or batch_id not in listed:
                    diff.missing.append(f"{pipeline_id}/{batch_id}")
                    continue
                fields = sorted(f for f in set(was) | set(now)
                                if f not in NOT_SNAPSHOTTED and was.get(f) != now.get(f))
                if fields:
                    diff.differing.append(f"{pipeline_id}/{batch_id}: {', '.join(fields)}")
        if not await source.exists(keys.batch_indexes_built(pipeline_id)):
            # The live side fills its filter indexes at the pipeline's first filtered page
            # (core.paging.ensure_indexes), a rebuild at once: until then batches from before
            # the indexes are in the rebuilt ones only, and GET answers alike either way.
            continue
        missing = {m.split("/", 1)[1] for m in diff.missing if m.startswith(pipeline_id + "/")}
        for key, name in _index_names(pipeline_id):
            held, rebuilt_held = await _members(source, key), await _members(rebuilt, key)
            diff.differing += [
                f"{pipeline_id}/{b}: {'not ' if b in held else ''}indexed under {name}"
                for b in sorted((held ^ rebuilt_held) - missing)]
    return diff
