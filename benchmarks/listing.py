"""bench-api's filtered list rows: a pipeline whose few running batches sit under a long
history of stopped ones, paged by `state=running` and by a `created_after`/`created_before`
window, beside the unfiltered page of a history as long. A filter reads its own index, so
its page should cost what the unfiltered one does (the ratio printed).

`python -m benchmarks.listing` alone: the same history on a redis-server of its own, each
filter's second page read in-process through `BatchStore.page` (no HTTP), printing the
client's and Redis's time per page. `state=stop` has no index of its own (it merges the
outcome indexes in a script): its row is the one to watch."""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any, cast

import httpx

from benchmarks.harness import Load, machine_anchors, redis_cpu_seconds, wrk
from benchmarks.own_redis import own_redis
from core import keys
from core.codec import Event
from core.connections import open_redis
from core.list_filter import ListFilter
from core.models import OUTCOMES, PipelineSpec, StepSpec, new_batch_id
from core.scripts import Scripts
from core.settings import get_settings
from core.store import BatchStore

PIPELINE = "bench-states"
RUNNING = 200
STOPPED = 20_000


async def _seed(redis_url: str, steps: tuple[str, ...]) -> tuple[str, str]:
    """RUNNING batches, then STOPPED ones on top of them (newer), written straight to Redis.
    Returns the created_at of the first and of the 501st created (fixed-width UTC: nothing
    to escape in a URL)."""
    spec = PipelineSpec(name=PIPELINE, version="1",
                        steps=[StepSpec(name=s, uses="sales." + s) for s in steps])
    redis = await open_redis(get_settings().model_copy(update={"redis_url": redis_url}))
    store = BatchStore(redis, Scripts(redis), token_secret=b"bench")
    ids: list[str] = []
    try:
        for count, state in ((RUNNING, "running"), (STOPPED, "stop")):
            for start in range(0, count, 500):
                chunk = [new_batch_id() for _ in range(min(500, count - start))]
                for n in range(0, len(chunk), 50):
                    await asyncio.gather(*(store.create(PIPELINE, b, spec)
                                           for b in chunk[n : n + 50]))
                outcome = "completed" if state == "stop" else None
                await store.apply([Event("batch.state", b, PIPELINE, state=state,
                                         outcome=outcome, ts=1.0) for b in chunk])
                ids += chunk
        # A window of about the oldest 500 batches (the running ones and 300 stopped above
        # them; creates run 50 at a time, so their order is the sequence's within ~50).
        window = [cast(str, await redis.hget(keys.batch(PIPELINE, b), "created_at"))
                  for b in (ids[0], ids[RUNNING + 300])]
    finally:
        await redis.aclose()
    return window[0], window[1]


def _page_two(api: str, query: str, auth: dict[str, str], on_api: dict[str, Any]) -> Load:
    base = f"{api}/api/v1/batches/{PIPELINE}/?limit=100{query}"
    response = httpx.get(base, headers=auth)
    first = response.json()
    if response.status_code != 200 or first["token"] is None or len(first["items"]) != 100:
        raise RuntimeError(f"{query}: expected a full first page and a token, got "
                           f"{response.status_code} {str(first)[:300]}")
    return wrk(f"{base}&token={first['token']}", **on_api)


def filtered_rows(api: str, redis_url: str, steps: tuple[str, ...], auth: dict[str, str],
                  on_api: dict[str, Any]) -> list[tuple[str, Load]]:
    after, before = asyncio.run(_seed(redis_url, steps))
    history = f"{RUNNING:,} running under {STOPPED:,} stopped"
    return [
        (f"GET list ?state=running page 2 (limit 100), {history}",
         _page_two(api, "&state=running", auth, on_api)),
        (f"GET list ?created_after&created_before page 2 (limit 100), {history}",
         _page_two(api, f"&created_after={after}&created_before={before}", auth, on_api)),
    ]


async def _seed_direct(store: BatchStore, stopped: int) -> list[str]:
    """RUNNING running batches under `stopped` stopped ones (outcomes in turn); the ids in
    creation order."""
    spec = PipelineSpec(name=PIPELINE, version="1",
                        steps=[StepSpec(name=s, uses="sales." + s) for s in ("extract", "load")])
    ids = [new_batch_id() for _ in range(RUNNING + stopped)]
    for start in range(0, len(ids), 100):
        await asyncio.gather(*(store.create(PIPELINE, b, spec) for b in ids[start:start + 100]))
    for start in range(0, len(ids), 500):
        await store.apply([
            Event("batch.state", b, PIPELINE, state="running") if n < RUNNING else
            Event("batch.state", b, PIPELINE, state="stop", outcome=OUTCOMES[n % 4], ts=1.0)
            for n, b in enumerate(ids[start:start + 500], start=start)])
    return ids


async def _direct(args: argparse.Namespace) -> None:
    async with own_redis(args.redis_port, prefix="dhub-bench-listing-") as url:
        redis = await open_redis(get_settings().model_copy(update={"redis_url": url}))
        try:
            store = BatchStore(redis, Scripts(redis), token_secret=b"bench", changes_channel="")
            ids = await _seed_direct(store, args.stopped)
            at = [cast(str, await redis.hget(keys.batch(PIPELINE, ids[n]), "created_at"))
                  for n in (0, len(ids) // 2)]
            filters = [("unfiltered", ListFilter()),
                       ("state=running", ListFilter(state="running")),
                       ("state=stop", ListFilter(state="stop")),
                       ("state=stop&outcome=failed", ListFilter(state="stop", outcome="failed")),
                       ("created_after&created_before (oldest half)",
                        ListFilter(created_after=at[0], created_before=at[1])),
                       ("state=stop&created_before (oldest half)",
                        ListFilter(state="stop", created_before=at[1]))]
            rows = []
            for name, where in filters:
                first = await store.page(PIPELINE, args.limit, None, where)
                if first.token is None:
                    raise RuntimeError(f"{name}: no second page")
                server = await redis_cpu_seconds(redis) * 1e6
                started = time.perf_counter()
                for _ in range(args.pages):
                    page = await store.page(PIPELINE, args.limit, first.token, where)
                took = time.perf_counter() - started
                server = await redis_cpu_seconds(redis) * 1e6 - server
                rows.append((name, len(page.items), took / args.pages * 1e6,
                             server / args.pages))
        finally:
            await redis.aclose()
    print(f"\n{machine_anchors()}")
    print(f"\n{RUNNING:,} running under {args.stopped:,} stopped batches (outcomes in turn); "
          f"page 2 (limit {args.limit}) read {args.pages} times through BatchStore.page")
    print("| filter | rows | client wall µs/page | Redis CPU µs/page |")
    print("|---|---:|---:|---:|")
    for name, count, wall, server in rows:
        print(f"| {name} | {count} | {wall:,.0f} | {server:,.0f} |")


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.listing",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stopped", type=int, default=STOPPED, help="stopped batches")
    parser.add_argument("--pages", type=int, default=300, help="reads of each page")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--redis-port", type=int, default=6395,
                        help="port of the benchmark's own redis-server")
    asyncio.run(_direct(parser.parse_args()))


if __name__ == "__main__":
    cli()
