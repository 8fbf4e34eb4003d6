"""Redis's CPU for one batch in APPLY_EVENTS (`core.apply_script`), next to a bare script
doing the same read and write of the same hash (the anchor: HGETALL, then HSET of the
fields an offsets event changes).

    python -m benchmarks.apply_script [--batches 100] [--rounds 200] [--steps 3]

Each round applies one offsets event to each of `--batches` running batches of `--steps`
steps (4 partitions each) through `BatchStore.apply`, so every call is one APPLY_EVENTS of
all of them, as the events consumer's live polls are; with the change channel as the stack
has it (one message a changed batch) and without. Redis's CPU comes from INFO cpu: run it on
a quiet stack (`make up`; it needs Redis only, database 14 by default, flushed before and
after).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from benchmarks.harness import machine_anchors, redis_cpu_seconds
from core import keys
from core.codec import Event
from core.models import PipelineSpec, StepSpec, new_batch_id
from core.scripts import Scripts
from core.settings import get_settings
from core.store import BatchStore

# The anchor: what any apply of an offsets event must do to the hash, and nothing else.
_BARE = """
for i = 1, #KEYS do
  redis.call('HGETALL', KEYS[i])
  redis.call('HSET', KEYS[i], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'rev', ARGV[2])
end
return #KEYS
"""


async def _batches(store: BatchStore, n: int, steps: list[str]) -> list[str]:
    spec = PipelineSpec(name="bench-script", version="1",
                        steps=[StepSpec(name=s, uses="sales.load") for s in steps])
    ids = [new_batch_id() for _ in range(n)]
    for batch_id in ids:
        await store.create("bench-script", batch_id, spec)
    # Every step running, with offsets on 4 partitions: a hash as a live batch has it.
    await store.apply([Event("step.state", b, "bench-script", step=s, state="running")
                       for b in ids for s in steps])
    await store.apply([Event("step.offsets", b, "bench-script", step=s,
                             offsets={f"partition_{k}": 1 for k in range(4)})
                       for b in ids for s in steps])
    return ids


async def _per_batch(redis: Redis, rounds: int, n: int,
                     call: Callable[[int], Awaitable[None]]) -> float:
    """µs of Redis CPU per batch over `rounds` calls of `call(round)`."""
    before = await redis_cpu_seconds(redis)
    for r in range(rounds):
        await call(r)
    return (await redis_cpu_seconds(redis) - before) * 1e6 / (rounds * n)


async def run(args: argparse.Namespace) -> None:
    base = get_settings().redis_url.rsplit("/", 1)[0]
    redis = Redis.from_url(f"{base}/{args.redis_db}", decode_responses=True)
    await redis.flushdb()
    steps = [f"step{i}" for i in range(args.steps)]
    try:
        bare_sha = await redis.script_load(_BARE)
        print(f"Redis CPU per batch in one call of {args.batches} batches ({args.steps} steps x "
              f"4 partitions, one offsets event each), {args.rounds} calls a row")
        print("| what | µs of Redis CPU a batch | vs the bare read-write |")
        print("|---|---:|---:|")
        for channel, label in (("", "no change channel"), (keys.CHANGES_CHANNEL, "publishing")):
            store = BatchStore(redis, Scripts(redis), token_secret=b"unused",
                               changes_channel=channel)
            ids = await _batches(store, args.batches, steps)
            names = [keys.batch("bench-script", b) for b in ids]

            async def bare(r: int, names: list[str] = names) -> None:
                await redis.evalsha(bare_sha, len(names), *names,
                                    "off:step0:partition_0", str(r + 10), "moved:step0", "now")

            async def apply(r: int, ids: list[str] = ids, store: BatchStore = store) -> None:
                await store.apply([Event("step.offsets", b, "bench-script", step="step0",
                                         offsets={f"partition_{r % 4}": r + 10}) for b in ids])

            anchor = await _per_batch(redis, args.rounds, args.batches, bare)
            applied = await _per_batch(redis, args.rounds, args.batches, apply)
            print(f"| bare HGETALL + HSET (anchor) | {anchor:.1f} | 100% |")
            print(f"| APPLY_EVENTS, {label} | {applied:.1f} | {applied / anchor:.0%} |")
            await redis.flushdb()
        print(machine_anchors())
    finally:
        await redis.flushdb()
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--redis-db", type=int, default=14)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
