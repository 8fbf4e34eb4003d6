"""Writing what the compacted topics hold back into Redis (the Redis half of a rebuild;
`consumers.rebuild` reads the topics).

Into an empty database, with no API and no consumer writing meanwhile: nothing here is
atomic across batches, and a consumer running against a half-rebuilt Redis would drop the
events of batches not restored yet (unknown batch) and commit past them. `rebuild --force`
writes over a database that is not empty (an API kept taking POSTs after a loss): the
restored hashes replace what was there, and each restored pipeline's filter indexes and
finished buckets are backfilled again from them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final

import orjson
from redis.asyncio import Redis

from core import keys
from core.lua_hset import HSET_ALL_LUA
from core.packing import pack, packable
from core.paging import Pager, ensure_finished
from core.registry import PipelineRegistry, Registered
from core.snapshots import PipelineVersion, Snapshot
from core.store import BatchStore

# Hashes written per script call: big enough that the calls' overhead vanishes, small
# enough that one call holds Redis (single-threaded) for a few milliseconds only.
CHUNK: Final = 500
# ... and bytes of a call's argument, for large batches: a snapshot may hold ~10 MB of hash
# (core.snapshots compresses it to fit a record), and 500 such would be one 5 GB argument,
# past Redis's proto-max-bulk-len (512 MB) and seconds of Redis decoding it. A hash larger
# than this goes alone.
CHUNK_BYTES: Final = 8 << 20

# KEYS[1] the pipeline's batch index, KEYS[2..] batch hashes of that pipeline (one slot on
# Redis Cluster: they share its hash tag)
# ARGV[1] JSON array, per hash in the order of KEYS: [batch id, seq, [field, value, ...],
# whether the batch keeps its de-duplication counter]
# Writes each hash and its place in the batch index. A script rather than a pipeline of
# HSETs because of the client: redis-py encodes every field of every command in Python,
# which was two thirds of a rebuild's time; one JSON argument per call costs one encode.
# The hash is the snapshot's alone: of one already there (`rebuild --force` over older data)
# the fields the snapshot lacks are removed, else they stayed (a running batch's plain
# offsets beside the packed ones, which they win over); after the snapshot's are written,
# not by a DEL first (a script's writes before an error stay, as UNPACK's reasoning goes).
# Two fields the snapshot never carries are kept: `seen_n` for a batch not stopped (its
# seen-ids set stays), and `deleted` (a snapshot is never taken of a hidden batch: the
# DELETE was answered, by a live API during `rebuild --force` or before the older data was
# saved), which keeps the batch out of the index as HIDE_BATCH left it.
RESTORE_HASHES: Final = HSET_ALL_LUA + """
for i, row in ipairs(cjson.decode(ARGV[1])) do
  local key, flat, stale, hidden = KEYS[i + 1], row[3], {}, false
  if redis.call('EXISTS', key) == 1 then
    local kept = {deleted = true}
    for j = 1, #flat, 2 do kept[flat[j]] = true end
    if row[4] then kept['seen_n'] = true end
    for _, name in ipairs(redis.call('HKEYS', key)) do
      if not kept[name] then stale[#stale + 1] = name end
    end
    hidden = redis.call('HEXISTS', key, 'deleted') == 1
  end
  hset_all(key, flat)
  for j = 1, #stale, 1000 do
    redis.call('HDEL', key, unpack(stale, j, math.min(j + 999, #stale)))
  end
  if not hidden then redis.call('ZADD', KEYS[1], row[2], row[1]) end
end
return #KEYS - 1
"""


# KEYS[1] a pipeline's registration order (keys.pipeline_order), ARGV the versions in the
# order the topic's records say. The list becomes ARGV, then the versions only it held (in
# its order), in one step: a version a PUT registers meanwhile is not lost from it.
REORDER_VERSIONS: Final = """
local held = redis.call('LRANGE', KEYS[1], 0, -1)
local wanted, order = {}, {}
for _, v in ipairs(ARGV) do wanted[v] = true; order[#order + 1] = v end
for _, v in ipairs(held) do if not wanted[v] then order[#order + 1] = v end end
local same = #order == #held
for i = 1, #order do if order[i] ~= held[i] then same = false end end
if not same then
  redis.call('DEL', KEYS[1])
  for i = 1, #order, 1000 do
    redis.call('RPUSH', KEYS[1], unpack(order, i, math.min(i + 999, #order)))
  end
end
return same and 0 or 1
"""


@dataclass(slots=True)
class Restored:
    pipelines: int = 0
    versions: int = 0
    batches: int = 0
    hidden: int = 0
    conflicts: list[str] = field(default_factory=list)


async def restore_pipelines(registry: PipelineRegistry, versions: Iterable[PipelineVersion],
                            restored: Restored) -> None:
    """Registers each version in its pipeline's registration order (the last is latest).
    Over a registry that holds versions already (`rebuild --force`: the pipeline PUT again
    after a loss), registering appends, so the order is then written as the records say
    (versions only the registry holds after them)."""
    by_pipeline: dict[str, list[PipelineVersion]] = defaultdict(list)
    for version in versions:
        by_pipeline[version.pipeline_id].append(version)
    for pipeline_id, found in sorted(by_pipeline.items()):
        wanted = [v.spec.version for v in sorted(found, key=lambda v: v.order)]
        for version in sorted(found, key=lambda v: v.order):
            outcome = await registry.register(pipeline_id, version.spec)
            if outcome is Registered.CONFLICT:  # the database was not empty
                restored.conflicts.append(f"{pipeline_id}/{version.spec.version}")
            restored.versions += 1
        await registry.redis.eval(REORDER_VERSIONS, 1, keys.pipeline_order(pipeline_id),
                                  *wanted)
        restored.pipelines += 1


def _stored(fields: dict[str, str]) -> dict[str, str]:
    """The hash as Redis keeps it: a finished batch packed (`core.packing`), as the events
    path leaves it, whether its snapshot was taken packed or before packing existed."""
    return pack(fields) if packable(fields) else fields


def restore_calls(snaps: Iterable[Snapshot]) -> Iterator[tuple[list[str], bytes]]:
    """The snapshots as RESTORE_HASHES calls: each call's batch ids and its ARGV[1], at most
    CHUNK hashes and CHUNK_BYTES of argument (one larger hash alone)."""
    ids: list[str] = []
    rows: list[bytes] = []
    size = 0
    for snap in snaps:
        row = orjson.dumps([snap.batch_id, str(snap.seq),
                            [x for item in _stored(snap.fields).items() for x in item],
                            snap.fields.get("state") != "stop"])
        if ids and (len(ids) == CHUNK or size + len(row) > CHUNK_BYTES):
            yield ids, b"[" + b",".join(rows) + b"]"
            ids, rows, size = [], [], 0
        ids.append(snap.batch_id)
        rows.append(row)
        size += len(row) + 1
    if ids:
        yield ids, b"[" + b",".join(rows) + b"]"


async def restore_batches(redis: Redis, store: BatchStore, pager: Pager,
                          snapshots: Iterable[Snapshot], hidden: set[tuple[str, str]],
                          restored: Restored, *, seqs: Mapping[str, int] | None = None) -> None:
    """Each batch's hash as snapshotted (its `seq`, `rev`, `created_at`, `updated_at`
    included; a finished one packed), the batch index and the sequence counter (the highest
    `seq` restored or in `seqs`, the highest known per pipeline, purged batches' included:
    new batches continue the order, and a paging token from before never lists one), then
    the list's filter indexes and the retention's finished buckets by their own backfills
    (the stopped batches bucketed by the hour of their `updated_at`). A batch deleted but
    not yet purged (`hidden`) is hidden again by the store."""
    script = redis.register_script(RESTORE_HASHES)
    by_pipeline: dict[str, list[Snapshot]] = defaultdict(list)
    for snap in snapshots:
        by_pipeline[snap.pipeline_id].append(snap)
    for pipeline_id, snaps in sorted(by_pipeline.items()):
        index = keys.batch_index(pipeline_id)
        for ids, rows in restore_calls(snaps):
            await script(keys=[index, *(keys.batch(pipeline_id, b) for b in ids)], args=[rows])
        await raise_seqs(redis, {pipeline_id: max(snap.seq for snap in snaps)})
        for snap in snaps:
            if (pipeline_id, snap.batch_id) in hidden:
                await store.hide(pipeline_id, snap.batch_id)
                restored.hidden += 1
        # The filter indexes and the finished buckets from the hashes (hidden batches
        # skipped), and the markers that say they are complete. Their markers dropped
        # first: over a Redis that was not empty (`rebuild --force`) they are set, and the
        # backfills they stand for would be skipped, leaving a restored batch in the
        # indexes and buckets of its older state. Both backfills are idempotent.
        await redis.delete(keys.batch_indexes_built(pipeline_id),
                           keys.batch_finished_indexed(pipeline_id))
        await pager.ensure_indexes(pipeline_id)
        await ensure_finished(redis, store.scripts, pipeline_id)
        restored.batches += len(snaps)
    await raise_seqs(redis, seqs or {})  # a pipeline whose batches were all purged, too


# KEYS[1] a pipeline's sequence counter, ARGV[1] a sequence: the counter raised to it, in one
# step (an API's create taking the counter between a read and a write would be undone).
RAISE_SEQ: Final = """
if (tonumber(redis.call('GET', KEYS[1])) or 0) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 0
"""


def highest(snapshots: Iterable[Snapshot], seqs: Mapping[str, int]) -> dict[str, int]:
    """Per pipeline, the highest sequence of `snapshots` and `seqs`."""
    out = dict(seqs)
    for snap in snapshots:
        out[snap.pipeline_id] = max(out.get(snap.pipeline_id, 0), snap.seq)
    return out


async def raise_seqs(redis: Redis, seqs: Mapping[str, int]) -> None:
    """Each pipeline's sequence counter raised to at least its `seqs` entry."""
    script = redis.register_script(RAISE_SEQ)
    for pipeline_id, seq in sorted(seqs.items()):
        await script(keys=[keys.batch_seq(pipeline_id)], args=[seq])
