"""Rebuilds Redis from Kafka: `python -m consumers.rebuild [--redis-url URL]` (`make rebuild`).

Reads, each from its start to its end as of now, the compacted pipelines topic (every
version), the compacted snapshots topic (the latest hash of every batch not purged) and the
commands topic's deletes (a batch deleted but not yet purged is hidden again), stops (a
stop's follow-up job is queued again) and runs (a batch whose run command was not taken yet
has no snapshot: its command's record restores it, `core.restore_runs`), each in its place
on the topic (`consumers.rebuild_commands`), and writes them into an empty Redis
(`core.restore`). Then the normal consumers take over, each group from its committed
offsets: the events consumer snapshots every batch its polls reached before committing them,
so every event before its committed offset is in a snapshot, and the events after it are
applied as usual (those the snapshots already hold change nothing: every rule of
`APPLY_EVENTS` only moves forward). See docs/architecture.md, "Durable state".

Run it with the API and the consumers stopped: it refuses a database that holds keys or a
live consumers' heartbeat. `--redis-url` names another database for a dry run, and
`--compare-with` the live one to check the rebuild against (`core.state_diff`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from redis.asyncio import Redis

from consumers.plumbing.active import ActiveRuns
from consumers.rebuild_commands import CommandsRead, requeue, restore_claims
from core import keys
from core.connections import open_redis
from core.layout import RESUMED_FROM, is_visible
from core.logs import scrub
from core.paging import Pager
from core.registry import PipelineRegistry
from core.restore import Restored, highest, raise_seqs, restore_batches, restore_pipelines
from core.restore_runs import from_run_commands, highest_seqs
from core.scripts import Scripts
from core.settings import BadSetting, Settings, checked_redis_url, get_settings
from core.snapshots import PipelineVersion, Snapshot
from core.state_diff import StateDiff, compare
from core.store import BatchStore

log = logging.getLogger(__name__)


class NotEmpty(RuntimeError):
    """The target database holds data, or consumers are writing to it."""


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


async def rebuild(settings: Settings, *, force: bool = False) -> Restored:
    redis = await open_redis(settings)
    try:
        # Refused under --force too: a consumer writing meanwhile (its event applied, its
        # snapshot not read yet, then its commit) has its change overwritten for good.
        if await redis.exists(keys.HEARTBEAT_CONSUMERS):
            raise NotEmpty(f"consumers are running on {scrub(settings.redis_url)}: "
                           "stop them (and the API) first")
        if not force and await redis.dbsize():
            raise NotEmpty(f"{scrub(settings.redis_url)} is not empty: "
                           "stop the API and the consumers and flush it, or pass --force")
        purged: set[tuple[str, str]] = set()
        versions, snapshots, commands = await asyncio.gather(
            read_pipelines(settings), read_snapshots(settings, purged), read_commands(settings))
        deletes = commands.deletes
        # Batches whose run command was not taken yet: restored from what it recorded.
        committed, retention_s, now = (await committed_offsets(settings),
                                       settings.batch_retention_days * 86400, time.time())
        runs = commands.to_restore(committed, retention_s, now)
        snapshots += from_run_commands(runs, versions, snapshots, purged)
        removed = commands.removed_published(
            committed, retention_s, now, {(s.pipeline_id, s.batch_id) for s in snapshots} | purged)
        scripts = Scripts(redis)
        # No change notifications: nothing is listening during a rebuild.
        store = BatchStore(redis, scripts,
                           token_secret=settings.token_secret.get_secret_value().encode(),
                           changes_channel="", dedup_window=settings.dedup_window)
        pager = Pager(redis, scripts, settings.token_secret.get_secret_value().encode())
        restored = Restored()
        # The sequence counters past every batch the runs recorded, purged ones included: a
        # paging token from before the loss continues below them (`core.paging`). Raised
        # before any pipeline is registered: a POST an API takes meanwhile (one left
        # running) makes the newest batch, not one below the batches restored after it.
        seqs = highest(snapshots, highest_seqs(commands.recorded.values()))
        await raise_seqs(redis, seqs)
        await restore_pipelines(PipelineRegistry(redis, scripts), versions, restored)
        await restore_batches(redis, store, pager, snapshots, deletes, restored, seqs=seqs)
        if force:
            # Over older data (a backup), a batch removed since is still there: its
            # tombstone says it is gone, as it was before the loss.
            await _purge_held(redis, store, sorted(purged))
        # The reconciler's walk: every batch that may still have a live flow run.
        active = ActiveRuns(redis)
        stops = commands.stops
        stopping: list[tuple[tuple[str, str], float]] = []
        for snap in snapshots:
            batch = (snap.pipeline_id, snap.batch_id)
            if (is_visible(snap.fields) and snap.fields.get("state") != "stop"
                    and batch not in deletes):
                await active.add(snap.pipeline_id, snap.batch_id)
                holder = snap.fields.get(RESUMED_FROM)
                if holder is not None:
                    # A live resume keeps the data it goes on from from being deleted
                    # (service.resume): its record was in Redis alone.
                    await store.note_resume(snap.pipeline_id, holder, snap.batch_id)
                if batch in stops:
                    # A stop that found its flow run Pending left a follow-up job, and the
                    # run is cancelled by it only (the batch is not `stop` till then).
                    stopping.append((batch, commands.stop_at[batch].ts))
        await requeue(redis, "delete", [((s.pipeline_id, s.batch_id), time.time())
                                        for s in snapshots
                                        if (s.pipeline_id, s.batch_id) in deletes])
        await requeue(redis, "stop", stopping)
        await restore_claims(redis, commands, purged, settings.idempotency_ttl_s, removed)
        return restored
    finally:
        await redis.aclose()


async def _purge_held(redis: Redis, store: BatchStore, batches: list[tuple[str, str]]) -> None:
    """Purges those of `batches` whose hash the database holds."""
    async with redis.pipeline(transaction=False) as pipe:
        for pipeline_id, batch_id in batches:
            pipe.exists(keys.batch(pipeline_id, batch_id))
        held = await pipe.execute()
    for (pipeline_id, batch_id), exists in zip(batches, held, strict=True):
        if exists:
            await store.purge(pipeline_id, batch_id)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)  # its per-topic chatter
    try:
        return asyncio.run(run(argv))
    except BadSetting as exc:
        print(f"rebuild refused: {exc}", file=sys.stderr)
        return 2


async def run(argv: list[str] | None = None, settings: Settings | None = None) -> int:
    """The command line's work (on `settings`, default the environment's); its exit code."""
    parser = argparse.ArgumentParser(prog="python -m consumers.rebuild", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", help="the database to rebuild (default DHUB_REDIS_URL)")
    parser.add_argument("--force", action="store_true",
                        help="write into a database that is not empty, the consumers "
                             "stopped (the batches the topics hold replace its copies; those "
                             "removed since are purged)")
    parser.add_argument("--compare-with", metavar="URL",
                        help="after the rebuild, compare it with this database (the live one: "
                             "a dry run); exit code 1 when they differ")
    args = parser.parse_args(argv)
    settings = settings or get_settings()
    # Checked as DHUB_REDIS_URL is: `model_copy` runs no validator, and a path that is no
    # database number would be database 0, the live one.
    if args.redis_url:
        settings = settings.model_copy(
            update={"redis_url": checked_redis_url(args.redis_url, "--redis-url")})
    if args.compare_with:
        checked_redis_url(args.compare_with, "--compare-with")
    started = time.monotonic()
    try:
        restored = await rebuild(settings, force=args.force)
    except NotEmpty as exc:
        print(f"rebuild refused: {exc}", file=sys.stderr)
        return 2
    print(f"rebuilt in {time.monotonic() - started:.1f}s: {restored.pipelines} pipelines "
          f"({restored.versions} versions), {restored.batches} batches "
          f"({restored.hidden} deleted, not yet purged)"
          + (f"; conflicting versions: {', '.join(restored.conflicts)}"
             if restored.conflicts else ""))
    if args.compare_with:
        diff = await _compare(settings, args.compare_with)
        print(f"compared {diff.batches} batches with {scrub(args.compare_with)}: "
              f"{len(diff.missing)} missing, {len(diff.extra)} extra, {len(diff.differing)} "
              f"differing; pipelines differing: {', '.join(diff.pipelines) or 'none'}")
        for line in (diff.missing + diff.extra + diff.differing)[:20]:
            print(f"  {line}")
        return 0 if diff.equal else 1
    return 0


async def _compare(settings: Settings, source_url: str) -> StateDiff:
    source = await open_redis(settings.model_copy(update={"redis_url": source_url}))
    rebuilt = await open_redis(settings)
    try:
        return await compare(source, rebuilt)
    finally:
        await source.aclose()
        await rebuilt.aclose()


if __name__ == "__main__":
    sys.exit(main())
