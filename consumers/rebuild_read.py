"""What the topics hold for a rebuild (`consumers.rebuild`): each read whole, from its start
to its end as of now, with no group (no committed offset anywhere moves).

- the compacted pipelines topic: every registered version, in its pipeline's order
  (`reordered`: two versions at one place, a registry that went back, are ordered as written);
- the compacted snapshots topic: each batch's latest snapshot or tombstone (`SnapshotsRead`:
  a key's records on several partitions, the topic's partitions raised since);
- the commands topic (`consumers.rebuild_commands.CommandsRead`), and the commands group's
  committed offsets (which run commands were taken).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from consumers.rebuild_commands import CommandsRead
from core.settings import Settings
from core.snapshots import PipelineVersion, Snapshot

log = logging.getLogger(__name__)


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    partitions = consumer.partitions_for_topic(topic)
    if partitions is None:  # not in the consumer's metadata yet
        await consumer._client.force_metadata_update()  # no public call for it
        partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise RuntimeError(f"topic {topic} does not exist")
    return [TopicPartition(topic, p) for p in sorted(partitions)]


async def read_whole(settings: Settings, topic: str, found: list[int] | None = None
                     ) -> AsyncIterator[ConsumerRecord[bytes, bytes]]:
    """Every record of `topic` from its start up to its end as of the call (no group, so
    no committed offset anywhere moves). `found`, when given, gets the topic's partitions."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                max_partition_fetch_bytes=8 << 20, fetch_max_bytes=64 << 20)
    await consumer.start()
    try:
        tps = await partitions_of(consumer, topic)
        if found is not None:
            found[:] = [tp.partition for tp in tps]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        left = {tp for tp in tps if ends[tp] > 0}
        while left:
            batch = await consumer.getmany(*left, timeout_ms=500)
            for tp, records in batch.items():
                for record in records:
                    if record.offset < ends[tp]:
                        yield record
                if records and records[-1].offset + 1 >= ends[tp]:
                    left.discard(tp)
            for tp in list(left):  # a partition whose tail is compacted away or aborted
                if await consumer.position(tp) >= ends[tp]:
                    left.discard(tp)
    finally:
        await consumer.stop()


async def read_pipelines(settings: Settings) -> list[PipelineVersion]:
    latest: dict[bytes, tuple[PipelineVersion, tuple[int, int]]] = {}
    found: list[int] = []
    async for record in read_whole(settings, settings.topic_pipelines, found):
        if record.key is None:
            continue
        if record.value is None:  # a tombstone: until compaction, the records before it stay
            latest.pop(record.key, None)
        else:
            # Where the record is, for `reordered`: its offset on the one partition the
            # topic has; on several, the producers' timestamps.
            at = (0, record.offset) if len(found) == 1 else (record.timestamp, record.offset)
            latest[record.key] = (PipelineVersion.decode(record.value), at)
    return reordered(list(latest.values()))


def reordered(versions: list[tuple[PipelineVersion, tuple[int, int]]]) -> list[PipelineVersion]:
    """Each version's place in its pipeline's registration order (`order`), its record's
    own unless two versions of a pipeline hold one place: the registry went back between
    their records (Redis lost, the pipeline PUT again before the rebuild, each PUT's place
    taken in the registry it saw). Then the records are walked in the order written (`at`),
    and each whose place is not past every one before it takes the next place past them (a
    version PUT again unchanged keeps its place: it is no other version's)."""
    by_pipeline: dict[str, list[tuple[PipelineVersion, tuple[int, int]]]] = {}
    for row in versions:
        by_pipeline.setdefault(row[0].pipeline_id, []).append(row)
    out: list[PipelineVersion] = []
    for rows in by_pipeline.values():
        orders = [version.order for version, _ in rows]
        if len(set(orders)) == len(orders):
            out += [version for version, _ in rows]
            continue
        top = -1
        for version, _ in sorted(rows, key=lambda row: row[1]):
            if version.order > top:
                top = version.order
                out.append(version)
            else:
                top += 1
                out.append(replace(version, order=top))
    return out


def current_partition(key: bytes, count: int) -> int:
    """The partition the producers send `key`'s records to now (their default partitioner,
    which `consumers.plumbing.snapshot_batch` calls too)."""
    partitions = list(range(count))
    return int(DefaultPartitioner()(key, partitions, partitions))


@dataclass(slots=True)
class SnapshotsRead:
    """Each batch's latest snapshot or tombstone, per partition of the snapshots topic.

    A batch's records share a partition until partitions are added to the topic: its later
    ones then go to another (`current_partition`), and its last record before the raise
    stays on the old one (compaction keeps it), possibly with a higher `rev` than a reused
    id's new batch, or behind a tombstone that has none. So the partition the key goes to now
    holds its newest record whenever it holds any; a key on none but older ones goes by its
    records' timestamps (the producers' clocks). A key never tombstoned is one batch's life,
    whose highest `rev` is its latest wherever it went."""

    # key -> (partition, its latest snapshot there or None for a tombstone, the timestamp of
    # the key's last record there): the key's records on one partition, the usual case.
    held: dict[bytes, tuple[int, Snapshot | None, int]] = field(default_factory=dict)
    # key -> partition -> (snapshot or None, timestamp): the keys met on several partitions.
    spread: dict[bytes, dict[int, tuple[Snapshot | None, int]]] = field(default_factory=dict)
    # The keys met with a tombstone (anywhere).
    tombstoned: set[bytes] = field(default_factory=set)

    def take(self, record: ConsumerRecord[bytes, bytes]) -> None:
        key = record.key
        if key is None:
            return
        snap = None if record.value is None else Snapshot.decode(record.value)
        if snap is None:
            self.tombstoned.add(key)
        one = self.held.get(key)
        if one is not None and one[0] != record.partition:
            self.spread[key] = {one[0]: (one[1], one[2])}
            del self.held[key]
            one = None
        mine = self.spread.get(key)
        if mine is None:
            kept = None if one is None else (one[1], one[2])
            self.held[key] = (record.partition, *self._after(kept, snap, record.timestamp))
        else:
            mine[record.partition] = self._after(mine.get(record.partition), snap,
                                                 record.timestamp)

    @staticmethod
    def _after(kept: tuple[Snapshot | None, int] | None, snap: Snapshot | None,
               ts: int) -> tuple[Snapshot | None, int]:
        """A partition's latest state of a key once `snap` (None: a tombstone) is read after
        `kept`. Of two snapshots the higher `rev` wins whatever their order (two writers can
        race by a few ms: a run command's creation record and the events consumer's first
        change); one after a tombstone is a batch of that id again."""
        if snap is None or kept is None or kept[0] is None or snap.rev >= kept[0].rev:
            return snap, ts
        return kept[0], max(kept[1], ts)

    def latest(self, partitions: int) -> dict[bytes, Snapshot | None]:
        """Per key, its newest snapshot, or None when that is its tombstone."""
        out = {key: snap for key, (_, snap, _) in self.held.items()}
        for key, mine in self.spread.items():
            if key not in self.tombstoned:
                # One batch's life (an id is used again only after a purge): its highest
                # `rev`, whichever partition a producer's metadata sent it to (one that has
                # not learnt of the raise yet, for up to its metadata.max.age.ms, still
                # sends to the old one).
                out[key] = max((snap for snap, _ in mine.values() if snap is not None),
                               key=lambda snap: snap.rev)
                continue
            now = mine.get(current_partition(key, partitions))
            out[key] = (now if now is not None else max(mine.values(), key=lambda h: h[1]))[0]
        return out


async def read_snapshots(settings: Settings,
                         purged: set[tuple[str, str]] | None = None) -> list[Snapshot]:
    """The latest snapshot per batch (`SnapshotsRead`), tombstoned ones left out (and added
    to `purged` when given)."""
    read = SnapshotsRead()
    found: list[int] = []
    async for record in read_whole(settings, settings.topic_snapshots, found):
        read.take(record)
    latest = read.latest(len(found))
    if purged is not None:
        for key, kept in latest.items():
            if kept is None:
                pipeline_id, _, batch_id = key.decode().partition("/")
                purged.add((pipeline_id, batch_id))
    return [snap for snap in latest.values() if snap is not None]


async def read_commands(settings: Settings) -> CommandsRead:
    """The batches the commands topic still holds a delete or a stop for, the API's runs
    with their record and the batches published with a creation request, each in its place
    on the topic (`consumers.rebuild_commands`)."""
    read = CommandsRead()
    async for record in read_whole(settings, settings.topic_commands):
        read.take(record)
    return read


async def committed_offsets(settings: Settings) -> dict[int, int]:
    """The commands group's committed offset (the next it reads) per partition of the
    commands topic; none for a group that never committed."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(settings.group_commands)
    except KafkaError as exc:
        # Every run command is then taken for one not taken yet (as before this look): a
        # batch the retention removed may come back, pending.
        log.warning("the commands group's offsets could not be read (%s): every API run "
                    "command with no snapshot restores its batch", exc)
        return {}
    finally:
        await admin.close()
    return {tp.partition: int(meta.offset) for tp, meta in offsets.items()
            if tp.topic == settings.topic_commands and meta.offset >= 0}
