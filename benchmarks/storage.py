"""make bench-storage: what a batch costs Redis, finished and running (issue 12: a finished
batch in at most 1 KB).

100k batches of 3 steps x 8 partitions are created (`BatchStore.create`, as the API does, with
an effective config) in a redis-server of the benchmark's own, and written through the real
events path (`BatchStore.apply`: APPLY_EVENTS, polls of 100 batches): scheduled with a flow run
id, running, each step running with offsets and totals reported several times, then success,
and the batch's stop (sent twice: a re-delivered stop). Redis's `used_memory` is read after the
creates, while every batch is running, and once every batch is finished; the difference from
the empty server divided by the count is a batch's cost, its hash and every index included.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any, cast

import orjson
from redis.asyncio import Redis

from benchmarks.harness import machine_anchors
from benchmarks.own_redis import own_redis
from core import keys
from core.codec import Event
from core.models import OUTCOMES, PipelineSpec, StepSpec, new_batch_id
from core.scripts import Scripts
from core.store import BatchStore
from deploy.local.parts.redis import MEMORY_CONFIG

PIPELINE = "bench-storage"
STEPS = ("extract", "transform", "load")
PARTITIONS = 8
RECORDS = 1_000_000  # a partition's total
GOAL_BYTES = 1024
POLL = 100  # batches per apply, as a poll of the events consumer groups them
# The demo pipeline's effective config as a batch hash holds it (JSON, 314 bytes).
CONFIG = orjson.dumps({step: {"fail_at": None, "invalid_rate": 0.02, "partitions": 3,
                              "rows": 6001, "seed": 42, "throttle": None}
                       for step in STEPS}).decode()


def running_events(batch_id: str) -> list[Event]:
    """A batch's events up to mid-run: every step running, offsets half-way."""
    out = [Event("batch.state", batch_id, PIPELINE, state="scheduled",
                 flow_run_id="0b5c3a8e-6f1d-4c2a-9e57-3d1f2a4b5c6d"),
           Event("batch.state", batch_id, PIPELINE, state="running")]
    totals = {f"partition_{p}": RECORDS + p for p in range(PARTITIONS)}
    for step in STEPS:
        out.append(Event("step.state", batch_id, PIPELINE, step=step, state="running"))
        for n in (1, 2):
            out.append(Event("step.offsets", batch_id, PIPELINE, step=step, totals=totals,
                             offsets={part: n * total // 4 for part, total in totals.items()}))
    return out


def finishing_events(batch_id: str) -> list[Event]:
    """The rest: every offset at its total, every step success, the batch's stop (twice)."""
    out: list[Event] = []
    totals = {f"partition_{p}": RECORDS + p for p in range(PARTITIONS)}
    for step in STEPS:
        out.append(Event("step.offsets", batch_id, PIPELINE, step=step, totals=totals,
                         offsets=totals))
        out.append(Event("step.state", batch_id, PIPELINE, step=step, state="success"))
    stop = Event("batch.state", batch_id, PIPELINE, state="stop", outcome="completed",
                 reason="Completed")
    return [*out, stop, stop]


async def memory(redis: Redis) -> int:
    info: dict[str, Any] = await redis.info("memory")
    return int(info["used_memory"])


async def apply_all(store: BatchStore, ids: list[str], events_of: Any) -> None:
    for start in range(0, len(ids), POLL):
        await store.apply([e for batch_id in ids[start:start + POLL] for e in events_of(batch_id)])


async def main(args: argparse.Namespace) -> None:
    spec = PipelineSpec(name=PIPELINE, version="1",
                        steps=[StepSpec(name=s, uses="sales." + s) for s in STEPS])
    config = {} if args.redis_defaults else MEMORY_CONFIG
    async with own_redis(args.redis_port, config, prefix="dhub-bench-storage-") as url:
        redis = Redis.from_url(url, decode_responses=True)
        try:
            store = BatchStore(redis, Scripts(redis), token_secret=b"bench", changes_channel="")
            base = await memory(redis)
            ids = [new_batch_id() for _ in range(args.batches)]
            started = time.perf_counter()
            for start in range(0, len(ids), 100):
                await asyncio.gather(*(store.create(PIPELINE, b, spec, {"config": CONFIG})
                                       for b in ids[start:start + 100]))
            created = await memory(redis) - base
            await apply_all(store, ids, running_events)
            running = await memory(redis) - base
            sample = keys.batch(PIPELINE, ids[0])
            running_hash = await redis.memory_usage(sample) or 0
            running_seen = await redis.memory_usage(keys.batch_seen(PIPELINE, ids[0])) or 0
            running_encoding = await redis.object("encoding", sample)
            await apply_all(store, ids, finishing_events)
            finished = await memory(redis) - base
            took = time.perf_counter() - started
            finished_hash = await redis.memory_usage(sample) or 0
            finished_encoding = await redis.object("encoding", sample)
            entries = await redis.hlen(sample)
            # `stop` has no index of its own: every stopped batch is in its outcome's.
            stopped = sum([await redis.zcard(keys.batch_outcome_index(PIPELINE, outcome))
                           for outcome in OUTCOMES])
            names = cast(list[str], await redis.keys(f"dhub:{{{PIPELINE}}}:batches*"))
            indexes = {name: await redis.memory_usage(name, samples=0) or 0
                       for name in sorted(names)}
        finally:
            await redis.aclose()
    n = args.batches
    print(f"\n{machine_anchors()}")
    print(f"\n{n} batches of {len(STEPS)} steps x {PARTITIONS} partitions written through "
          f"BatchStore.create and BatchStore.apply (APPLY_EVENTS) in {took:.1f} s; "
          f"{stopped} stopped; redis-server with "
          f"{' '.join(f'{k} {v}' for k, v in config.items()) or 'its defaults'}")
    print("| batches | used_memory delta | bytes per batch | one hash (MEMORY USAGE) | "
          "its encoding |")
    print("|---|---:|---:|---:|---|")
    print(f"| created (pending) | {created / 1e6:.1f} MB | {created / n:,.0f} | | |")
    print(f"| running (offsets half-way) | {running / 1e6:.1f} MB | {running / n:,.0f} | "
          f"{running_hash:,} (+ seen ids {running_seen:,}) | {running_encoding} |")
    print(f"| finished (stop) | {finished / 1e6:.1f} MB | {finished / n:,.0f} | "
          f"{finished_hash:,} ({entries} fields) | {finished_encoding} |")
    print("\nwhere a finished batch's bytes go: its hash (MEMORY USAGE, keyspace entry "
          "included), then each index per batch")
    print(f"| hash | {finished_hash:,} |")
    for name, used in indexes.items():
        if used:
            print(f"| {name.split(':', 2)[2]} | {used / n:,.0f} |")
    verdict = "PASS" if finished / n <= GOAL_BYTES else "MISS"
    print(f"targets: a finished batch at most {GOAL_BYTES:,} bytes: {verdict} "
          f"({finished / n:,.0f} bytes, {finished / n / GOAL_BYTES:.2f} of the goal)")


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.storage")
    parser.add_argument("--batches", type=int, default=100_000)
    parser.add_argument("--redis-port", type=int, default=6393,
                        help="port of the benchmark's own redis-server")
    parser.add_argument("--redis-defaults", action="store_true",
                        help="Redis's own hash encoding limits instead of the stack's")
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
