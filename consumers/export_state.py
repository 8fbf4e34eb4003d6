"""Writes what Redis holds today onto the compacted topics: `python -m consumers.export_state`
(`make export-state`).

For a deployment whose pipelines and batches predate the durable records (`core.snapshots`):
run once after the API and the consumers that write the records are started, and Redis can
be rebuilt from Kafka (`make rebuild`) from then on. Safe beside the running stack and safe to
run again: a version's record is the same bytes each time, a batch's snapshot is its current
hash (a rebuild keeps the highest `rev` of a batch's snapshots still on the topic). A batch
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

from consumers.plumbing.part import Clients, open_clients
from core import keys
from core.registry import PipelineRegistry
from core.scripts import Scripts
from core.settings import Settings, get_settings
from core.snapshots import SnapshotWriter, pipeline_key, pipeline_record

# Batches read and sent per round: a few MB of hashes at most.
CHUNK = 1000


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
            batches += await writer.write_current((pipeline_id, b) for b in ids)
            start += CHUNK
    return versions, batches


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
