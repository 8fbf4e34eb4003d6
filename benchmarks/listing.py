"""bench-api's filtered list rows: a pipeline whose few running batches sit under a long
history of stopped ones, paged by `state=running` and by a `created_after`/`created_before`
window, beside the unfiltered page of a history as long. A filter reads its own index, so
its page should cost what the unfiltered one does (the ratio printed)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import httpx

from benchmarks.harness import Load, wrk
from core import keys
from core.codec import Event
from core.connections import open_redis
from core.models import PipelineSpec, StepSpec, new_batch_id
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
                await store.apply([Event("batch.state", b, PIPELINE, state=state,
                                         outcome="completed", ts=1.0) for b in chunk])
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
