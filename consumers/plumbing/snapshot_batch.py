"""The events consumer's snapshots of a poll, at a cost per batch close to a plain read.

`core.snapshots.SnapshotWriter.write_current` writes the same records one `send()` each from
hashes read as Python dicts; at 1,000 batches a poll that was a third of the consumer's CPU
(hiredis turning ~80 fields a hash into Python strings, a dict per hash, orjson, and a future
and a partitioner call per record). Here:

- Redis builds each record itself (`RECORDS`, one call per pipeline and chunk, pipelined):
  the hash, minus `core.snapshots.NOT_SNAPSHOTTED`, encoded by cjson into the exact shape
  `snapshot_record` writes (`Snapshot.decode` reads both), so Python receives one string a
  batch and never builds the hash.
- The records go in one `BatchBuilder` per partition (`create_batch` / `send_batch`, a
  future per partition, not per record), partitioned exactly as `send()` would (the
  producer's own partitioner on the same key): a batch's snapshots, its creation snapshot
  and its tombstone share a partition, which compaction needs.

The guarantee is `write_current`'s: returns once the broker acknowledged every record
(acks=all, idempotent producer), or raises (the caller's retry writes them all again). A
batch purged between the read of its record and its send (retention, a delete's clean-up)
may have its purge's tombstone land before that record: once sent, the batches asked for that
were purged get a tombstone again (`SnapshotWriter.tombstone_purged`, as every snapshot
writer does), so the last record of a purged batch's key is one.

`admit` fences a write whose records were read under a partition assignment that has
since been revoked (`consumers.plumbing.stages`): checked right before the records go to
the producer, it raises `Fenced` instead of letting an older snapshot land after the new
owner's. A write past that check is awaited by the revoke (`quiet`), but not the tombstones
sent again after it: they only go to batches that are gone, whoever owns them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Final

from aiokafka import AIOKafkaProducer
from aiokafka.producer.message_accumulator import BatchBuilder
from redis.asyncio import Redis

from core import keys
from core.script_calls import run_all
from core.snapshots import NOT_SNAPSHOTTED, SnapshotWriter, fit_record, snapshot_key

# KEYS: batch hashes of one pipeline. ARGV[1] the pipeline id, ARGV[2] each KEY's batch id,
# space-separated (ids hold no space: core.models.ID_PATTERN; one argument, not one per
# batch: packing the arguments was half the client's cost), ARGV[3..] the fields left out.
# Returns per key the record's JSON, or false for a hash that is gone or deleted
# (APPLY_EVENTS's -1: its purge writes the tombstone). A table with string keys encodes as a
# JSON object; every value is a string, so nothing is reformatted.
RECORDS: Final = """
local skip = {}
for i = 3, #ARGV do skip[ARGV[i]] = true end
local ids = {}
for id in string.gmatch(ARGV[2], '%S+') do ids[#ids + 1] = id end
local out = {}
for i, key in ipairs(KEYS) do
  local flat = redis.call('HGETALL', key)
  local fields, deleted = {}, false
  for j = 1, #flat, 2 do
    local name = flat[j]
    if name == 'deleted' then deleted = true end
    if not skip[name] then fields[name] = flat[j + 1] end
  end
  if #flat == 0 or deleted then
    out[i] = false
  else
    out[i] = cjson.encode({pipeline_id = ARGV[1], batch_id = ids[i], fields = fields})
  end
end
return out
"""
CHUNK: Final = 200  # batches a script call: bounds the time Redis spends in one call
# Bytes a partition's builder takes before another starts. One record batch per partition
# per poll (the broker's max.message.bytes is 1 MB): 16 KB builders, the producer's default,
# would put a thousand 1 KB snapshots in ~60 batches, one produce round trip each.
BUILDER_BYTES: Final = 768 << 10
_PARTITIONS_CACHED: Final = 100_000  # keys whose partition is remembered (murmur2 is Python)


class Fenced(Exception):
    """The write was not sent: its records were read before a revoke (see the module's
    doc). Nothing of it reached Kafka; the partition's owner snapshots those batches."""


class SnapshotBatches:
    def __init__(self, producer: AIOKafkaProducer, redis: Redis, topic: str,
                 admit: Callable[[], bool] | None = None) -> None:
        self.producer = producer
        self.admit = admit
        self._sending = 0
        self._quiet = asyncio.Event()
        self._quiet.set()
        self.redis = redis
        self.topic = topic
        self._script = redis.register_script(RECORDS)
        self._writer = SnapshotWriter(producer, redis, topic)  # its purged batches' check
        self._skip = sorted(NOT_SNAPSHOTTED)
        self._partition_of: dict[bytes, int] = {}
        self._partition_count = 0
        self.too_large = 0  # snapshots not written: over one record even compressed

    async def write_current(self, batches: Sequence[tuple[str, str]]) -> int:
        """Snapshots of the batches as Redis holds them now; returns how many were written
        (a batch gone or deleted meanwhile is skipped: its purge writes its tombstone; so is
        one too large for a record even compressed, see `core.snapshots.fit_record`)."""
        if not batches:
            return 0
        records = await self._records(batches)
        written = await self._send(batches, records)
        await self._writer.tombstone_purged(batches)
        return written

    async def _records(self, batches: Sequence[tuple[str, str]]) -> list[str | None]:
        by_pipeline: dict[str, list[int]] = {}
        for n, (pipeline_id, _) in enumerate(batches):
            by_pipeline.setdefault(pipeline_id, []).append(n)
        order: list[int] = []
        calls: list[list[Any]] = []
        for pipeline_id, indexes in by_pipeline.items():
            for start in range(0, len(indexes), CHUNK):
                chunk = indexes[start : start + CHUNK]
                order += chunk
                calls.append([len(chunk), *(keys.batch(pipeline_id, batches[n][1])
                                            for n in chunk),
                              pipeline_id, " ".join(batches[n][1] for n in chunk), *self._skip])
        results = await run_all(self.redis, self._script, calls)
        out: list[str | None] = [None] * len(batches)
        for n, value in zip(order, (v for r in results for v in r), strict=True):
            out[n] = value or None  # false arrives as None
        return out

    async def _send(self, batches: Sequence[tuple[str, str]],
                    records: list[str | None]) -> int:
        count = await self._partitions()
        if self.admit is not None and not self.admit():
            raise Fenced(f"{len(batches)} snapshots read before a revoke")
        builders: dict[int, BatchBuilder] = {}
        sends: list[asyncio.Future[Any]] = []
        written = 0
        self._sending += 1
        self._quiet.clear()
        try:
            for (pipeline_id, batch_id), record in zip(batches, records, strict=True):
                if record is None:
                    continue
                value = fit_record(pipeline_id, batch_id, record.encode())
                if value is None:
                    self.too_large += 1
                    continue
                key = snapshot_key(pipeline_id, batch_id)
                partition = self._partition(key, count)
                builder = builders.get(partition)
                if builder is None:
                    builder = builders[partition] = self._builder()
                if builder.append(timestamp=None, key=key, value=value) is None:
                    # Full: send it and start the next (the same partition's next batch
                    # waits for this one to leave: the accumulator keeps their order).
                    sends.append(await self.producer.send_batch(
                        builder, self.topic, partition=partition))
                    builder = builders[partition] = self._builder()
                    # An empty builder takes any one record (fit_record keeps it within
                    # what the broker takes).
                    builder.append(timestamp=None, key=key, value=value)
                written += 1
            for partition, builder in builders.items():
                sends.append(await self.producer.send_batch(
                    builder, self.topic, partition=partition))
        finally:
            # Every batch queued is awaited, even when a later one failed to queue: none is
            # left behind unobserved, and the caller's retry sends them all again.
            try:
                outcomes = await asyncio.gather(*sends, return_exceptions=True)
            finally:
                self._sending -= 1
                if not self._sending:
                    self._quiet.set()
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return written

    async def quiet(self) -> None:
        """Returns once no write past its `admit` check is waiting for the broker."""
        await self._quiet.wait()

    def _builder(self) -> BatchBuilder:
        # The accumulator takes any builder; the producer's own `create_batch` would size it
        # to its max_batch_size (16 KB), see BUILDER_BYTES.
        return BatchBuilder(BUILDER_BYTES, 0, is_transactional=False)

    async def _partitions(self) -> int:
        partitions = await self.producer.partitions_for(self.topic)
        if len(partitions) != self._partition_count:
            # Partitions added to the topic: keys move, as they do for `send()`.
            self._partition_count = len(partitions)
            self._partition_of.clear()
        return self._partition_count

    def _partition(self, key: bytes, count: int) -> int:
        partition = self._partition_of.get(key)
        if partition is None:
            if len(self._partition_of) >= _PARTITIONS_CACHED:
                self._partition_of.clear()
            # The producer's partitioner, as `send()` calls it for a keyed record.
            all_partitions = list(range(count))
            partition = self._partition_of[key] = self.producer._partitioner(
                key, all_partitions, all_partitions)
        return partition
