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

from redis.asyncio import Redis

from consumers.plumbing.active import ActiveRuns
from consumers.rebuild_commands import requeue, restore_claims
from consumers.rebuild_read import (
    committed_offsets,
    read_commands,
    read_pipelines,
    read_snapshots,
)
from core import keys
from core.connections import open_redis
from core.layout import RESUMED_FROM, is_visible
from core.logs import scrub
from core.packing import unpacked
from core.paging import Pager
from core.registry import PipelineRegistry
from core.restore import Restored, highest, raise_seqs, restore_batches, restore_pipelines
from core.restore_runs import from_run_commands, highest_seqs
from core.scripts import Scripts
from core.settings import BadSetting, Settings, checked_redis_url, get_settings
from core.state_diff import StateDiff, compare
from core.store import BatchStore

log = logging.getLogger(__name__)


class NotEmpty(RuntimeError):
    """The target database holds data, or consumers are writing to it."""


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
            if not is_visible(snap.fields) or batch in deletes:
                continue
            # Read inside a packed hash too: a finished batch's snapshot may be packed.
            holder = unpacked(snap.fields).get(RESUMED_FROM)
            if holder is not None:
                # A resume keeps the data it goes on from (service.resume): its record was in
                # Redis alone. A stopped one too: one that never ran a step goes on from
                # there if resumed in turn, so the retention keeps that batch for it.
                await store.note_resume(snap.pipeline_id, holder, snap.batch_id)
            if snap.fields.get("state") != "stop":
                await active.add(snap.pipeline_id, snap.batch_id)
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
