"""`make bench-live`: N clients streaming one batch (SSE) from one API process; a change applied
through the events path (`BatchStore.apply`, the events consumer's call: one APPLY_EVENTS that
publishes the new hash) -> received by every client. Latency p50/p99 from the apply to each
client's receipt, and the API's memory per 1,000 open streams.

Anchor, in the same run: the same client fleet on a bare aiohttp SSE fan-out
(`benchmarks/bare_sse.py`: a POST pushes one body to every open stream; no Redis, no auth),
i.e. what aiohttp and these two cores cost to push one message to N clients.

The clients run in `--procs` processes of their own (asyncio, aiohttp); the API, Redis and the
clients share the machine's cores, so the client fleet's own work is inside the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import re
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from benchmarks import churn
from benchmarks.harness import free_port, machine_anchors, server, stack
from core.codec import Event
from core.connections import open_redis
from core.settings import get_settings
from core.store import BatchStore

TOKEN = "bench-live-" + uuid.uuid4().hex
PIPELINE = "bench-live"
MARKER = re.compile(rb'":(\d{5,})[,}]')  # an offset (or marker) of 10,000 or more
FIRST_MARKER = 10_000


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _client_proc(url: str, headers: dict[str, str], count: int, changes: int,
                 ready: Any, go: Any, out: Any) -> None:
    """Opens `count` streams, reports ready, then records when each change's marker arrives
    on each stream; sends back [(marker, receipt time), ...]."""
    async def one(session: aiohttp.ClientSession, got: list[tuple[int, float]],
                  opened: asyncio.Event) -> None:
        async with session.get(url, headers=headers) as response:
            seen = FIRST_MARKER - 1
            buffer = b""
            async for chunk in response.content.iter_any():
                now = time.time()
                buffer += chunk
                while b"\n\n" in buffer:
                    message, buffer = buffer.split(b"\n\n", 1)
                    opened.set()
                    found = [int(m) for m in MARKER.findall(message)]
                    if found and max(found) > seen:
                        seen = max(found)
                        got.append((seen, now))
                if seen >= FIRST_MARKER + changes - 1:
                    return

    async def main() -> None:
        got: list[tuple[int, float]] = []
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            events = [asyncio.Event() for _ in range(count)]
            tasks = []
            for event in events:
                tasks.append(asyncio.create_task(one(session, got, event)))
                await asyncio.sleep(0)
            await asyncio.gather(*(e.wait() for e in events))
            ready.put(count)
            await asyncio.get_running_loop().run_in_executor(None, go.wait)
            try:
                async with asyncio.timeout(60):
                    await asyncio.gather(*tasks)
            except TimeoutError:
                for task in tasks:
                    task.cancel()
        out.put(got)

    asyncio.run(main())


def run_fleet(url: str, headers: dict[str, str], clients: int, procs: int, changes: int,
              change: Callable[[int], Awaitable[None]], api_pid: int) -> dict[str, float]:
    """Opens the fleet, makes `changes` changes 0.3 s apart, and
    returns latency percentiles (ms) and memory per 1,000 streams (KiB)."""
    ctx = mp.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    rss_before = _rss_kib(api_pid)
    shares = [clients // procs + (1 if n < clients % procs else 0) for n in range(procs)]
    workers = [ctx.Process(target=_client_proc,
                           args=(url, headers, share, changes, ready, go, out))
               for share in shares]
    for worker in workers:
        worker.start()
    for _ in workers:
        ready.get(timeout=120)
    rss_open = _rss_kib(api_pid)
    go.set()
    sent: dict[int, float] = {}

    async def drive() -> None:
        await change(FIRST_MARKER - 1)  # warms the driver's connection: not timed
        for n in range(changes):
            marker = FIRST_MARKER + n
            sent[marker] = time.time()
            await change(marker)
            await asyncio.sleep(0.3)

    asyncio.run(drive())
    latencies: list[float] = []
    received = 0
    for _ in workers:
        for marker, at in out.get(timeout=120):
            if marker in sent:
                latencies.append((at - sent[marker]) * 1000)
                received += 1
    for worker in workers:
        worker.join(30)
    latencies.sort()
    return {"p50": statistics.median(latencies) if latencies else float("nan"),
            "p99": latencies[int(len(latencies) * 0.99) - 1] if latencies else float("nan"),
            "delivered": received / (clients * changes),
            "kib_per_1000": (rss_open - rss_before) * 1000 / clients}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=2_000)
    parser.add_argument("--changes", type=int, default=10)
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--redis-db", type=int, default=13)
    args = parser.parse_args()
    base = get_settings().redis_url.rsplit("/", 1)[0]
    redis_url = f"{base}/{args.redis_db}"
    suffix = uuid.uuid4().hex[:8]
    with stack(["redis", "kafka"]), tempfile.TemporaryDirectory() as tmp:
        async def seed() -> str:
            redis = await open_redis(get_settings().model_copy(update={"redis_url": redis_url}))
            await redis.flushdb()
            await redis.aclose()
            [batch_id] = await churn.seed(redis_url, PIPELINE, 1)
            return batch_id
        batch_id = asyncio.run(seed())
        env = {"DHUB_REDIS_URL": redis_url, "DHUB_API_TOKENS": TOKEN,
               "DHUB_TOPIC_COMMANDS": f"bench.{suffix}.commands",
               "DHUB_TOPIC_EVENTS": f"bench.{suffix}.events"}
        api_port, bare_port = free_port(), free_port()
        auth = {"Authorization": f"Bearer {TOKEN}", "Accept": "text/event-stream"}
        with server(["-m", "service"], api_port, {**env, "DHUB_API_PORT": str(api_port)}) as api:
            url = f"http://127.0.0.1:{api_port}/api/v1/batches/{PIPELINE}/{batch_id}"
            body = httpx.get(url, headers={"Authorization": auth["Authorization"]}).content
            payload = Path(tmp) / "batch.json"
            payload.write_bytes(body)

            stores: list[BatchStore] = []  # one client, opened in the driving loop

            async def apply(marker: int) -> None:
                if not stores:
                    redis = await open_redis(
                        get_settings().model_copy(update={"redis_url": redis_url}))
                    stores.append(BatchStore.from_settings(redis, get_settings()))
                await stores[0].apply([Event("step.offsets", batch_id, PIPELINE,
                                             step=churn.STEPS[0],
                                             offsets={"partition_0": marker})])

            dhub = run_fleet(url, auth, args.clients, args.procs, args.changes, apply, api.pid)
        with server(["-m", "benchmarks.bare_sse", str(bare_port), str(payload)], bare_port,
                    {}) as bare:
            bare_url = f"http://127.0.0.1:{bare_port}"

            clients: list[httpx.AsyncClient] = []  # one connection, as the API's Redis

            async def push(marker: int) -> None:
                if not clients:
                    clients.append(httpx.AsyncClient())
                await clients[0].post(f"{bare_url}/push", content=b'{"marker":%d}' % marker)

            anchor = run_fleet(f"{bare_url}/stream", {}, args.clients, args.procs,
                               args.changes, push, bare.pid)
    print(f"\n{machine_anchors()}\n")
    print(f"{args.clients:,} SSE clients in {args.procs} processes, {args.changes} changes, "
          "0.3 s apart\n")
    print("| what | p50 ms | p99 ms | delivered | server memory per 1,000 streams |")
    print("|---|---:|---:|---:|---:|")
    for name, row in (("bare aiohttp SSE fan-out (anchor)", anchor),
                      ("dhub: change applied (BatchStore.apply) -> every stream", dhub)):
        print(f"| {name} | {row['p50']:.1f} | {row['p99']:.1f} | {row['delivered']:.1%} | "
              f"{row['kib_per_1000']:,.0f} KiB |")
    per_client_kb = dhub["kib_per_1000"] / 1000 * 1.024
    print(f"\ndhub p99 / anchor p99 = {dhub['p99'] / anchor['p99']:.1f}x; "
          f"p99 < 500 ms at {args.clients:,} clients: "
          f"{'PASS' if dhub['p99'] < 500 and dhub['delivered'] == 1 else 'MISS'}; "
          f"memory per client {per_client_kb:.1f} KB (< 50 KB: "
          f"{'PASS' if per_client_kb < 50 else 'MISS'})")
    print(machine_anchors())


if __name__ == "__main__":
    main()
