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
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import cast

import orjson
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from core import keys
from core.models import PipelineSpec

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
        data = orjson.loads(value)
        # Written by `snapshot_record` from a Redis hash: every key and value a string
        # already (not converted again: a rebuild decodes 100k of these).
        return cls(str(data["pipeline_id"]), str(data["batch_id"]),
                   cast(dict[str, str], data["fields"]))


class SnapshotWriter:
    """Writes snapshots and tombstones; each call returns once the broker has every record
    (the producers of this project are acks=all and idempotent), or raises."""

    def __init__(self, producer: AIOKafkaProducer, redis: Redis, topic: str) -> None:
        self.producer = producer
        self.redis = redis
        self.topic = topic

    async def write(self, pipeline_id: str, batch_id: str, fields: Mapping[str, str]) -> None:
        await self.producer.send_and_wait(self.topic, snapshot_record(pipeline_id, batch_id, fields),
                                          key=snapshot_key(pipeline_id, batch_id))

    async def write_current(self, batches: Iterable[tuple[str, str]]) -> int:
        """Snapshots of the batches as Redis holds them now (one pipelined read of their
        hashes, then every record sent before any is awaited). A batch gone meanwhile (purged)
        is skipped: its purge writes its tombstone. Returns how many were written."""
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
                if fields:
                    sends.append(await self.producer.send(
                        self.topic, snapshot_record(pipeline_id, batch_id, fields),
                        key=snapshot_key(pipeline_id, batch_id)))
        finally:
            # Every send queued is awaited, even when a later one failed to queue: none is
            # left behind unobserved, and the caller's retry sends them all again.
            outcomes = await asyncio.gather(*sends, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return len(sends)

    async def tombstone(self, pipeline_id: str, batch_id: str) -> None:
        """The batch is purged: a rebuild must not bring it back. Call it after the purge."""
        await self.producer.send_and_wait(self.topic, None, key=snapshot_key(pipeline_id, batch_id))
