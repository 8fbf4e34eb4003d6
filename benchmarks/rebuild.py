"""make bench-rebuild: the time to rebuild Redis from Kafka for 100k finished batches
(`consumers.rebuild` into an empty redis-server of its own), next to the time to simply read
the same records (the same group-less reads of the same topics, decoded, nothing written).

The topics are the benchmark's own (deleted afterwards): a pipeline version, one snapshot per
batch as the events consumer writes it (a finished 3-step batch, 8 partitions per step), and
one run command per batch with a delete for every 100th (the commands topic a rebuild reads
for deletes holds a week of commands). Issue 12's goal: under 60 s for 100k batches.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import orjson
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from redis.asyncio import Redis

from benchmarks.harness import machine_anchors
from benchmarks.own_redis import own_redis
from consumers.rebuild import rebuild
from consumers.rebuild_read import read_commands, read_pipelines, read_snapshots, read_whole
from core import keys
from core.codec import Command
from core.connections import open_producer
from core.models import PipelineSpec, StepSpec, deployment_name, new_batch_id, now_iso
from core.settings import Settings, get_settings
from core.snapshots import pipeline_key, pipeline_record, snapshot_key, snapshot_record

PIPELINE = "bench-rebuild"
STEPS = ("extract", "transform", "load")
PARTITIONS = 8
GOAL_S = 60.0


def finished_hash(batch_id: str, seq: int, at: str) -> dict[str, str]:
    """A finished batch's hash as APPLY_EVENTS leaves it (dedup state already dropped)."""
    fields = {
        "id": batch_id, "name": PIPELINE, "deployment": deployment_name(PIPELINE),
        "pipeline_id": PIPELINE, "pipeline_version": "1", "state": "stop",
        "steps": orjson.dumps(list(STEPS)).decode(), "created_at": at, "updated_at": at,
        "rev": "40", "seq": str(seq), "outcome": "completed", "stop_ts": "1764684000.123456",
        "flow_run_id": str(uuid.uuid4()),
        "config": orjson.dumps({s: {} for s in STEPS}).decode(),
    }
    for step in STEPS:
        fields[f"step:{step}"] = "success"
        fields[f"started:{step}"] = at
        fields[f"moved:{step}"] = at
        for part in range(PARTITIONS):
            fields[f"off:{step}:partition_{part}"] = str(1_000_000 + part)
    return fields


async def seed(settings: Settings, batches: int) -> None:
    producer = await open_producer(settings, linger_ms=5, max_batch_size=1 << 20)
    try:
        spec = PipelineSpec(name=PIPELINE, version="1",
                            steps=[StepSpec(name=s, uses="sales." + s) for s in STEPS])
        await producer.send_and_wait(settings.topic_pipelines, pipeline_record(PIPELINE, spec, 0),
                                     key=pipeline_key(PIPELINE, "1"))
        at = now_iso()
        sends = []
        for seq in range(1, batches + 1):
            batch_id = new_batch_id()
            sends.append(await producer.send(
                settings.topic_snapshots,
                snapshot_record(PIPELINE, batch_id, finished_hash(batch_id, seq, at)),
                key=snapshot_key(PIPELINE, batch_id)))
            run = Command("run", batch_id, PIPELINE, "1", event_id="run-" + batch_id)
            sends.append(await producer.send(settings.topic_commands, run.encode(), key=run.key))
            if seq % 100 == 0:
                delete = Command("delete", batch_id, PIPELINE, event_id="del-" + batch_id)
                sends.append(await producer.send(settings.topic_commands, delete.encode(),
                                                 key=delete.key))
            if len(sends) >= 20_000:
                await asyncio.gather(*sends)
                sends.clear()
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


@contextlib.asynccontextmanager
async def own_topics(settings: Settings) -> AsyncIterator[Settings]:
    tag = uuid.uuid4().hex[:8]
    own = settings.model_copy(update={
        "topic_pipelines": f"bench.{tag}.pipelines", "topic_snapshots": f"bench.{tag}.snapshots",
        "topic_commands": f"bench.{tag}.commands"})
    compacted = {"cleanup.policy": "compact"}
    names = [own.topic_pipelines, own.topic_snapshots, own.topic_commands]
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([
            NewTopic(own.topic_pipelines, 1, 1, topic_configs=compacted),
            NewTopic(own.topic_snapshots, settings.snapshots_partitions, 1,
                     topic_configs=compacted),
            NewTopic(own.topic_commands, settings.commands_partitions, 1)])
        yield own
    finally:
        await admin.delete_topics(names)
        await admin.close()


async def read_only(settings: Settings) -> tuple[float, float]:
    """Seconds to read every record of the three topics raw, and read and decoded as the
    rebuild decodes them."""
    started = time.perf_counter()
    for topic in (settings.topic_pipelines, settings.topic_snapshots, settings.topic_commands):
        async for _ in read_whole(settings, topic):
            pass
    raw = time.perf_counter() - started
    started = time.perf_counter()
    await asyncio.gather(read_pipelines(settings), read_snapshots(settings),
                         read_commands(settings))
    return raw, time.perf_counter() - started


async def main(args: argparse.Namespace) -> None:
    base = get_settings()
    async with own_topics(base) as settings:
        started = time.perf_counter()
        await seed(settings, args.batches)
        print(f"seeded {args.batches} batches in {time.perf_counter() - started:.1f}s")
        raw, decoded = await read_only(settings)
        async with own_redis(args.redis_port, prefix="dhub-bench-rebuild-") as url:
            target = settings.model_copy(update={"redis_url": url})
            started = time.perf_counter()
            restored = await rebuild(target)
            took = time.perf_counter() - started
            redis = Redis.from_url(url, decode_responses=True)
            try:
                listed = await redis.zcard(keys.batch_index(PIPELINE))
                memory = (await redis.info("memory"))["used_memory"]
            finally:
                await redis.aclose()
    print(f"\n{machine_anchors()}")
    print(f"\nrebuild of {args.batches} finished batches ({len(STEPS)} steps x {PARTITIONS} "
          f"partitions; {restored.hidden} deleted) from Kafka into an empty Redis")
    print("| what | seconds | batches/s | ratio to the read |")
    print("|---|---:|---:|---:|")
    for name, seconds in (("read the records (raw)", raw), ("read and decode them", decoded),
                          ("rebuild (read, decode, write Redis)", took)):
        print(f"| {name} | {seconds:.1f} | {args.batches / seconds:,.0f} | "
              f"{seconds / decoded:.2f} |")
    print(f"\nRedis after: {listed} batches listed, used_memory {memory / 1e6:.0f} MB")
    verdict = "PASS" if took < GOAL_S * args.batches / 100_000 else "MISS"
    print(f"targets: rebuild of 100k batches under {GOAL_S:.0f} s: {verdict} ({took:.1f} s "
          f"for {args.batches})")


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rebuild")
    parser.add_argument("--batches", type=int, default=100_000)
    parser.add_argument("--redis-port", type=int, default=6391,
                        help="port of the benchmark's own redis-server")
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
