"""`make bench-api`: the API's GET-by-id and POST throughput next to a bare aiohttp handler.

Everything runs in one go on this machine, so the ratio (API / bare) is the figure that
carries over between machines; the absolute req/s depend on the CPU. The API runs as its own
process on the stack's Redis (a database of its own) and Kafka (topics of its own).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from benchmarks.harness import Load, free_port, server, stack, wrk
from core.codec import Event
from core.connections import open_redis
from core.models import PipelineSpec, StepSpec, new_batch_id
from core.scripts import Scripts
from core.settings import get_settings
from core.store import BatchStore

TOKEN = "bench-" + uuid.uuid4().hex
PIPELINE = "bench-pipeline"
STEPS = ("extract", "transform", "load")


async def _topics(create: bool, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=get_settings().kafka_bootstrap)
    await admin.start()
    try:
        if create:
            await admin.create_topics([NewTopic(n, 3, 1) for n in names])
        else:
            await admin.delete_topics(names)
    finally:
        await admin.close()


@asynccontextmanager
async def _store_at(redis_url: str) -> AsyncIterator[BatchStore]:
    """A batch store on the benchmark's own Redis database."""
    redis = await open_redis(get_settings().model_copy(update={"redis_url": redis_url}))
    try:
        yield BatchStore(redis, Scripts(redis), token_secret=b"bench")
    finally:
        await redis.aclose()


async def _flush(redis_url: str) -> None:
    async with _store_at(redis_url) as store:
        await store.redis.flushdb()


async def _progress(redis_url: str, batch_id: str) -> None:
    """Gives the batch a realistic body: running, offsets on four partitions per step."""
    events = [Event("batch.state", batch_id, PIPELINE, state="running")]
    for n, step in enumerate(STEPS):
        events.append(Event("step.state", batch_id, PIPELINE, step=step,
                            state=("success", "running", "pending")[n]))
        events.append(Event("step.offsets", batch_id, PIPELINE, step=step,
                            offsets={f"partition_{p}": 25_000 - n * 5_000 for p in range(4)}))
    async with _store_at(redis_url) as store:
        await store.apply(events)


async def _history(redis_url: str, pipeline_id: str, count: int) -> None:
    """`count` batches of a pipeline written straight to Redis (no run commands)."""
    spec = PipelineSpec(name=pipeline_id, version="1",
                        steps=[StepSpec(name=s, uses="sales." + s) for s in STEPS])
    async with _store_at(redis_url) as store:
        for start in range(0, count, 50):
            await asyncio.gather(*(store.create(pipeline_id, new_batch_id(), spec)
                                   for _ in range(min(50, count - start))))


def row(name: str, load: Load, anchor: float) -> str:
    return (f"| {name} | {load.rps:,.0f} | {load.p50_ms:.2f} | {load.p99_ms:.2f} | "
            f"{load.rps / anchor:.0%} | {load.errors} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--redis-db", type=int, default=14)
    args = parser.parse_args()

    base = get_settings().redis_url.rsplit("/", 1)[0]
    redis_url = f"{base}/{args.redis_db}"
    suffix = uuid.uuid4().hex[:8]
    topics = [f"bench.{suffix}.commands", f"bench.{suffix}.events"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with stack(["redis", "kafka"]), tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_flush(redis_url))
        asyncio.run(_topics(True, topics))
        env = {"DHUB_REDIS_URL": redis_url, "DHUB_API_TOKENS": TOKEN,
               "DHUB_TOPIC_COMMANDS": topics[0], "DHUB_TOPIC_EVENTS": topics[1]}
        api_port, plain_port, bare_port = free_port(), free_port(), free_port()
        try:
            with server(["-m", "service"], api_port, {**env, "DHUB_API_PORT": str(api_port)}), \
                 server(["-m", "service"], plain_port,
                        {**env, "DHUB_API_PORT": str(plain_port), "DHUB_API_CACHE": "false"}):
                api = f"http://127.0.0.1:{api_port}"
                spec = {"name": "bench", "version": "1",
                        "steps": [{"name": s, "uses": "sales." + s} for s in STEPS]}
                httpx.put(f"{api}/api/v1/pipelines/{PIPELINE}", json=spec, headers=auth).raise_for_status()
                batch_id = httpx.post(f"{api}/api/v1/batches/{PIPELINE}", headers=auth).json()["item"]
                asyncio.run(_progress(redis_url, batch_id))
                path = f"/api/v1/batches/{PIPELINE}/{batch_id}"
                body = httpx.get(api + path, headers=auth).content
                payload = Path(tmp) / "batch.json"
                payload.write_bytes(body)
                post_script = Path(tmp) / "post.lua"
                post_script.write_text('wrk.method = "POST"\n')

                with server(["-m", "benchmarks.bare", str(bare_port), str(payload)], bare_port, {},
                            ready_path="/"):
                    bare_url = f"http://127.0.0.1:{bare_port}{path}"
                    opts = {"connections": args.connections, "seconds": args.seconds}
                    wrk(bare_url, seconds=2)  # warm-up
                    wrk(api + path, headers=auth, seconds=2)
                    bare1 = wrk(bare_url, **opts)
                    cached = wrk(api + path, headers=auth, **opts)
                    plain = wrk(f"http://127.0.0.1:{plain_port}{path}", headers=auth, **opts)
                    bare2 = wrk(bare_url, **opts)
                    post = wrk(f"{api}/api/v1/batches/{PIPELINE}", headers=auth, script=post_script,
                               **opts)
                    # A page's cost must not grow with history: the second page of 100, for a
                    # pipeline with 200 batches and one with 20,000.
                    pages = {}
                    for name, count in (("bench-small", 200), ("bench-large", 20_000)):
                        asyncio.run(_history(redis_url, name, count))
                        first = httpx.get(f"{api}/api/v1/batches/{name}/?limit=100", headers=auth)
                        url = f"{api}/api/v1/batches/{name}/?limit=100&token={first.json()['token']}"
                        pages[count] = wrk(url, headers=auth, **opts)
        finally:
            asyncio.run(_topics(False, topics))
            asyncio.run(_flush(redis_url))

    anchor = (bare1.rps + bare2.rps) / 2
    bare = Load(anchor, (bare1.p50_ms + bare2.p50_ms) / 2, max(bare1.p99_ms, bare2.p99_ms),
                bare1.errors + bare2.errors)
    print(f"\nGET {path} ({len(body)} bytes), {args.connections} connections, "
          f"{args.seconds} s each, wrk on the same 2-core machine\n")
    print("| what | req/s | p50 ms | p99 ms | vs bare handler | errors |")
    print("|---|---:|---:|---:|---:|---:|")
    print(row("bare aiohttp handler, same bytes (anchor)", bare, anchor))
    print(row("GET by id (cache on, the default)", cached, anchor))
    print(row("GET by id, cache off (HGETALL per request)", plain, anchor))
    print(row("POST run (Redis script + Kafka acks=all)", post, anchor))
    print(row("GET list page 2 (limit 100), 200 batches in history", pages[200], anchor))
    print(row("GET list page 2 (limit 100), 20,000 batches in history", pages[20_000], anchor))
    growth = pages[20_000].rps / pages[200].rps
    print(f"\nlist page with 100x the history: {growth:.0%} of the throughput "
          f"({'flat' if growth >= 0.85 else 'GROWS with history'})")
    target = cached.rps / anchor
    print(f"\nGET / bare = {target:.0%} (target >= 70%): {'PASS' if target >= 0.7 else 'MISS'}")


if __name__ == "__main__":
    main()
