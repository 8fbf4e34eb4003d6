"""The durable copies of what Redis holds, on compacted Kafka topics (issue 12).

- `topic_pipelines`, key `<pipeline_id>/<version>`: each registered version, written by the
  API before it answers the PUT; `order` is its place in the pipeline's registration order
  (the last is `latest`), so a rebuild need not rely on the order records arrive in.
- `topic_snapshots`, key `<pipeline_id>/<batch_id>`: the batch's whole hash as the last
  change left it: written by the commands consumer when it takes a pending batch's run
  command (its creation: pipeline, version, steps, effective config, created_at, seq) and by
  the events consumer after every poll that changed it (after the Redis effect, before the
  poll's commit, so a crash re-applies the events and writes the snapshot again). A purge
  writes a tombstone (`tombstone`), which compaction turns into the key's absence.

A finished batch's snapshot holds its packed form (`core.packing`) when Redis does, and a
rebuild writes it back as it is. A snapshot leaves out the de-duplication state (`seen_n`
and the seen-ids set): every rule of `APPLY_EVENTS` only moves forward, so events applied
again after a rebuild change nothing.

A snapshot is one Kafka record, and a batch with tens of thousands of offsets passes what one
record may be (the broker's `max.message.bytes`, 1 MB). A value over `COMPRESS_ABOVE` goes
gzip-compressed (`fit_record`; offsets compress 3-4x, so the ceiling is some 100,000
offsets); one still over `RECORD_LIMIT` is not written: logged, counted, and its durable copy
stays at the last snapshot that fitted. Sending it anyway would fail every flush for good
and hold the events consumer's commits back (a crash loop), for the sake of one batch.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, cast

import orjson
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from core import keys
from core.models import PipelineSpec
from core.script_calls import run_all

log = logging.getLogger(__name__)

# A compressed value starts with gzip's magic bytes, which no JSON text does.
GZIP_MAGIC: Final = b"\x1f\x8b"
# Values up to this go as they are: compressing a few KB costs more CPU than it saves bytes.
COMPRESS_ABOVE: Final = 256 << 10
# Below the producer's max_request_size (1 MiB) and the broker's max.message.bytes (1 MB and
# 12 bytes), leaving room for the key and the record batch's own header.
RECORD_LIMIT: Final = 1_000_000
# Level 1: ~6 ms for 1 MB of offsets against ~100 ms at 9, for 12% more bytes.
_LEVEL: Final = 1

# Hash fields a snapshot does not carry: the de-duplication window's counter, whose set is
# not snapshotted either (see the module's docstring).
NOT_SNAPSHOTTED = frozenset({"seen_n"})


def snapshot_key(pipeline_id: str, batch_id: str) -> bytes:
    return f"{pipeline_id}/{batch_id}".encode()


def pipeline_key(pipeline_id: str, version: str) -> bytes:
    return f"{pipeline_id}/{version}".encode()


def pipeline_record(pipeline_id: str, spec: PipelineSpec, order: int) -> bytes:
    return orjson.dumps({"pipeline_id": pipeline_id, "order": order,
                         "spec": spec.model_dump(mode="json")})


@dataclass(frozen=True, slots=True)
class PipelineVersion:
    pipeline_id: str
    order: int
    spec: PipelineSpec

    @classmethod
    def decode(cls, value: bytes) -> PipelineVersion:
        data = orjson.loads(value)
        return cls(str(data["pipeline_id"]), int(data["order"]),
                   PipelineSpec.model_validate(data["spec"]))


def snapshot_record(pipeline_id: str, batch_id: str, fields: Mapping[str, str]) -> bytes:
    kept = {k: v for k, v in fields.items() if k not in NOT_SNAPSHOTTED}
    return orjson.dumps({"pipeline_id": pipeline_id, "batch_id": batch_id, "fields": kept})


def fit_record(pipeline_id: str, batch_id: str, value: bytes) -> bytes | None:
    """The value to send for a batch's snapshot record: as it is, compressed when large, or
    None (logged) when it passes `RECORD_LIMIT` even compressed."""
    if len(value) <= COMPRESS_ABOVE:
        return value
    packed = gzip.compress(value, compresslevel=_LEVEL, mtime=0)
    if len(packed) <= RECORD_LIMIT:
        return packed
    log.error("snapshot of batch %s/%s too large for one record (%d bytes, %d compressed, "
              "limit %d): not written; its durable copy stays at its last snapshot",
              pipeline_id, batch_id, len(value), len(packed), RECORD_LIMIT)
    return None


@dataclass(frozen=True, slots=True)
class Snapshot:
    pipeline_id: str
    batch_id: str
    fields: dict[str, str]

    @property
    def rev(self) -> int:
        return int(self.fields.get("rev") or 0)

    @property
    def seq(self) -> int:
        return int(self.fields.get("seq") or 0)

    @classmethod
    def decode(cls, value: bytes) -> Snapshot:
        if value[:2] == GZIP_MAGIC:
            value = gzip.decompress(value)
        data = orjson.loads(value)
        # Written by `snapshot_record` from a Redis hash: every key and value a string
        # already (not converted again: a rebuild decodes 100k of these).
        return cls(str(data["pipeline_id"]), str(data["batch_id"]),
                   cast(dict[str, str], data["fields"]))


# KEYS: per batch of one pipeline its hash and its purge mark (keys.batch_purged). Returns the
# positions (1-based, of the batches) of those purged: the hash gone and the mark there (a
# hash gone without it is Redis having lost it: its snapshot is what a rebuild restores).
PURGED: Final = """
local out = {}
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 0 and redis.call('EXISTS', KEYS[i + 1]) == 1 then
    out[#out + 1] = (i + 1) / 2
  end
end
return out
"""
PURGED_CHUNK: Final = 200  # batches a PURGED call: bounds the time Redis spends in one


class SnapshotWriter:
    """Writes snapshots and tombstones; each call returns once the broker has every record
    (the producers of this project are acks=all and idempotent), or raises."""

    def __init__(self, producer: AIOKafkaProducer, redis: Redis, topic: str) -> None:
        self.producer = producer
        self.redis = redis
        self.topic = topic
        self.too_large = 0  # snapshots not written: over RECORD_LIMIT even compressed
        self._purged = redis.register_script(PURGED)

    async def write(self, pipeline_id: str, batch_id: str, fields: Mapping[str, str]) -> None:
        value = self._fit(pipeline_id, batch_id, fields)
        if value is not None:
            await self.producer.send_and_wait(self.topic, value,
                                              key=snapshot_key(pipeline_id, batch_id))

    def _fit(self, pipeline_id: str, batch_id: str, fields: Mapping[str, str]) -> bytes | None:
        value = fit_record(pipeline_id, batch_id, snapshot_record(pipeline_id, batch_id, fields))
        if value is None:
            self.too_large += 1
        return value

    async def write_current(self, batches: Iterable[tuple[str, str]]) -> int:
        """Snapshots of the batches as Redis holds them now (one pipelined read of their
        hashes, then every record sent before any is awaited). A batch gone meanwhile (purged)
        is skipped: its purge writes its tombstone; so is one too large for a record even
        compressed (`fit_record`). One purged between the read and the send may have its
        purge's tombstone land before the record: once sent, each batch purged (its hash gone,
        its purge mark there: `keys.batch_purged`) gets a tombstone again, so its key's last
        record is one. Returns how many were written."""
        pairs = list(batches)
        if not pairs:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for pipeline_id, batch_id in pairs:
                pipe.hgetall(keys.batch(pipeline_id, batch_id))
            hashes = cast(list[dict[str, str]], await pipe.execute())
        sends: list[asyncio.Future[object]] = []
        try:
            for (pipeline_id, batch_id), fields in zip(pairs, hashes, strict=True):
                value = self._fit(pipeline_id, batch_id, fields) if fields else None
                if value is not None:
                    sends.append(await self.producer.send(
                        self.topic, value, key=snapshot_key(pipeline_id, batch_id)))
        finally:
            # Every send queued is awaited, even when a later one failed to queue: none is
            # left behind unobserved, and the caller's retry sends them all again.
            outcomes = await asyncio.gather(*sends, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        await self.tombstone_purged(pairs)
        return len(sends)

    async def tombstone_purged(self, batches: Sequence[tuple[str, str]]) -> None:
        """Tombstones again, after a write of theirs was sent, the batches purged now (by
        retention, or a delete's clean-up: `PURGED`): purged after their records were read,
        their purge's tombstone may have landed before those records, and compaction keeps
        a key's last record, so a rebuild would bring them back. Purged after this look,
        their tombstone follows it. Pass every batch the write was asked for, not only those
        it sent: a retry after this look failed reads a batch purged meanwhile as gone and
        sends nothing for it, while the record an earlier attempt sent may be its last."""
        by_pipeline: dict[str, list[tuple[str, str]]] = {}
        for batch in batches:
            by_pipeline.setdefault(batch[0], []).append(batch)
        chunks = [mine[start : start + PURGED_CHUNK] for mine in by_pipeline.values()
                  for start in range(0, len(mine), PURGED_CHUNK)]
        replies = await run_all(self.redis, self._purged, [
            [2 * len(chunk), *(key for pipeline_id, batch_id in chunk for key in (
                keys.batch(pipeline_id, batch_id), keys.batch_purged(pipeline_id, batch_id)))]
            for chunk in chunks])
        await asyncio.gather(*[self.tombstone(*chunk[i - 1])
                               for chunk, reply in zip(chunks, replies, strict=True)
                               for i in reply])

    async def tombstone(self, pipeline_id: str, batch_id: str) -> None:
        """The batch is purged: a rebuild must not bring it back. Call it after the purge."""
        await self.producer.send_and_wait(self.topic, None, key=snapshot_key(pipeline_id, batch_id))
