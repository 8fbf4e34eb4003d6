"""The dashboard's real load for `make bench-api`: GETs spread over many batches while a writer
changes random ones through the real apply path.

- `seed`: N batches with a realistic body (offsets on 3 steps x 4 partitions), written
  through `BatchStore` on the benchmark's Redis database.
- `lua_script`: a wrk script asking for a random one of them per request.
- `writer`: a process of its own applying `rate` offset events/s to random batches with
  `BatchStore.apply` (the events consumer's call: one `APPLY_EVENTS` per batch, each
  publishing its invalidation), every event raising an offset so every one changes its batch.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time
from pathlib import Path
from typing import Any

from core.codec import Event
from core.connections import open_redis
from core.models import PipelineSpec, StepSpec, new_batch_id
from core.scripts import Scripts
from core.settings import get_settings
from core.store import BatchStore

STEPS = ("extract", "transform", "load")
TICK_S = 0.01


def _store(redis: Any) -> BatchStore:
    return BatchStore(redis, Scripts(redis), token_secret=b"bench")


async def seed(redis_url: str, pipeline_id: str, count: int) -> list[str]:
    """`count` running batches with offsets, as the dashboard would see them mid-run."""
    spec = PipelineSpec(name=pipeline_id, version="1",
                        steps=[StepSpec(name=s, uses="sales." + s) for s in STEPS])
    redis = await open_redis(get_settings().model_copy(update={"redis_url": redis_url}))
    store = _store(redis)
    ids = [new_batch_id() for _ in range(count)]
    try:
        for start in range(0, count, 100):
            chunk = ids[start:start + 100]
            await asyncio.gather(*(store.create(pipeline_id, b, spec) for b in chunk))
            events = []
            for b in chunk:
                events.append(Event("batch.state", b, pipeline_id, state="running"))
                for n, step in enumerate(STEPS):
                    events.append(Event("step.state", b, pipeline_id, step=step,
                                        state=("success", "running", "pending")[n]))
                    events.append(Event("step.offsets", b, pipeline_id, step=step,
                                        offsets={f"partition_{p}": 1_000 for p in range(4)}))
            await store.apply(events)
    finally:
        await redis.aclose()
    return ids


def lua_script(path: Path, pipeline_id: str, batch_ids: list[str]) -> Path:
    """A wrk script: each request a GET of a random batch (seeded per wrk thread)."""
    paths = ",\n".join(f'  "/api/v1/batches/{pipeline_id}/{b}"' for b in batch_ids)
    path.write_text(
        "local paths = {\n" + paths + "\n}\n"
        "local n = #paths\n"
        "local counter = 0\n"
        "function init(args)\n"
        "  counter = counter + 1\n"
        "  math.randomseed(os.time() + counter * 7919 + math.floor(os.clock() * 1e6))\n"
        "end\n"
        "function request()\n"
        "  return wrk.format('GET', paths[math.random(n)])\n"
        "end\n")
    return path


def _writer(redis_url: str, pipeline_id: str, batch_ids: list[str], rate: int,
            stop: Any, applied: Any) -> None:
    async def main() -> None:
        redis = await open_redis(get_settings().model_copy(update={"redis_url": redis_url}))
        store = _store(redis)
        rng = random.Random()
        per_tick = max(1, round(rate * TICK_S))
        offset, n, start = 1_000, 0, time.perf_counter()
        changed = 0
        try:
            while not stop.is_set():
                events = []
                for _ in range(per_tick):
                    offset += 1
                    events.append(Event("step.offsets", rng.choice(batch_ids), pipeline_id,
                                        step=rng.choice(STEPS),
                                        offsets={f"partition_{rng.randrange(4)}": offset}))
                # One pipelined round trip per tick, one script (and publish) per batch.
                results = await store.apply(events)
                changed += sum(v for v in results.values() if v > 0)
                n += per_tick
                ahead = n / rate - (time.perf_counter() - start)
                if ahead > 0:
                    await asyncio.sleep(ahead)
                elif n % (per_tick * 100) == 0:
                    await asyncio.sleep(0)
        finally:
            await redis.aclose()
            applied.value = changed / (time.perf_counter() - start)

    asyncio.run(main())


class Writer:
    """The churn writer as a child process; `rate` is what it achieved (changes/s)."""

    def __init__(self, redis_url: str, pipeline_id: str, batch_ids: list[str], rate: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._applied = ctx.Value("d", 0.0)
        self._proc = ctx.Process(target=_writer, args=(redis_url, pipeline_id, batch_ids, rate,
                                                       self._stop, self._applied), daemon=True)

    def __enter__(self) -> Writer:
        self._proc.start()
        time.sleep(1.0)  # at its rate before the measurement begins
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join()

    @property
    def rate(self) -> float:
        return float(self._applied.value)
