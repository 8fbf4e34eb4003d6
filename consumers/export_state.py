"""Writes what Redis holds today onto the compacted topics: `python -m consumers.export_state`
(`make export-state`).

For a deployment whose pipelines and batches predate the durable records (`core.snapshots`):
run once after the API and the consumers that write the records are started, and Redis can
be rebuilt from Kafka (`make rebuild`) from then on. Safe beside the running stack and safe to
run again: a version's record is the same bytes each time, a batch's snapshot is its current
hash, written again while the batch changed around the write (`write_settled`: compaction
keeps a key's last record, which must not be older than the events consumer's). A batch
deleted but not yet purged is not exported: its delete is under way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
from typing import cast

from redis.asyncio import Redis

from consumers.plumbing.part import Clients, open_clients
from core import keys
from core.registry import PipelineRegistry
from core.scripts import Scripts
from core.settings import Settings, get_settings
from core.snapshots import SnapshotWriter, pipeline_key, pipeline_record

# Batches read and sent per round: a few MB of hashes at most.
CHUNK = 1000
# Writes of a batch at most while it keeps changing between the reads around them.
SETTLE_ROUNDS = 10
log = logging.getLogger(__name__)


async def export(clients: Clients, settings: Settings) -> tuple[int, int]:
    """Every pipeline version and every visible batch; returns how many of each."""
    redis, producer = clients.redis, clients.producer
    registry = PipelineRegistry(redis, Scripts(redis))
    writer = SnapshotWriter(producer, redis, settings.topic_snapshots)
    versions = batches = 0
    for pipeline_id in await registry.ids():
        for order, spec in enumerate(await registry.versions(pipeline_id)):
            await producer.send_and_wait(settings.topic_pipelines,
                                         pipeline_record(pipeline_id, spec, order),
                                         key=pipeline_key(pipeline_id, spec.version))
            versions += 1
        index, start = keys.batch_index(pipeline_id), 0
        while True:
            ids = cast(list[str], await redis.zrange(index, start, start + CHUNK - 1))
            if not ids:
                break
            batches += await write_settled(writer, pipeline_id, ids)
            start += CHUNK
    return versions, batches


async def write_settled(writer: SnapshotWriter, pipeline_id: str, ids: list[str]) -> int:
    """Snapshots of the batches, each written again until its hash did not change between a
    read before the write and one after the broker took it; returns how many were written
    (once each). A batch that changed meanwhile may have had its newer snapshot written by
    the events consumer before this older one landed, and compaction keeps a key's last
    record: a rebuild would bring back the older version, its change's events committed.
    Unchanged through the write, any later change's snapshot comes after this one. One gone
    meanwhile (purged) gets a tombstone again from `write_current`: its purge's may have
    landed first."""
    written = 0
    todo = ids
    for round_ in range(SETTLE_ROUNDS):
        before = await _versions(writer.redis, pipeline_id, todo)
        count = await writer.write_current((pipeline_id, b) for b in todo)
        written += count if round_ == 0 else 0
        after = await _versions(writer.redis, pipeline_id, todo)
        todo = [b for b, was, now in zip(todo, before, after, strict=True)
                if now is not None and now != was]
        if not todo:
            return written
    # Batches changing at every look: each change is snapshotted by the events consumer.
    log.warning("export: %d batches of %s changed under each of %d writes", len(todo),
                pipeline_id, SETTLE_ROUNDS)
    return written


async def _versions(redis: Redis, pipeline_id: str, ids: list[str]) -> list[str | None]:
    """Each batch's `rev` as Redis holds it ('' without one), None when its hash is gone."""
    async with redis.pipeline(transaction=False) as pipe:
        for batch_id in ids:
            pipe.hget(keys.batch(pipeline_id, batch_id), "rev")
            pipe.exists(keys.batch(pipeline_id, batch_id))
        replies = await pipe.execute()
    return [cast(str | None, rev) or "" if exists else None
            for rev, exists in zip(replies[::2], replies[1::2], strict=True)]


async def _main(settings: Settings) -> tuple[int, int]:
    async with contextlib.AsyncExitStack() as scope:
        return await export(await open_clients(scope, settings), settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m consumers.export_state",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    versions, batches = asyncio.run(_main(get_settings()))
    print(f"exported {versions} pipeline versions and {batches} batches in "
          f"{time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
