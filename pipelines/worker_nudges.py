"""The stack's Prefect worker starts a flow run as soon as the commands consumer says it
created one (`keys.WORKER_NUDGES_CHANNEL`), instead of at its next poll.

A process worker only learns of scheduled runs by polling Prefect every
PREFECT_WORKER_QUERY_SECONDS, so a run waited half an interval on average before it was
picked up. A nudge makes the worker run its own poll (`get_and_submit_flow_runs`) at once.
The worker's polling loop goes on unchanged: it picks up whatever a lost nudge, a Redis
outage or a run created elsewhere leaves. A poll running beside the loop's is safe: the worker
submits a run only once (it checks and marks the run's id with no await in between), and
Prefect lets a Scheduled run become Pending only once.

Nudges that arrive while a poll runs are folded into one more poll after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from redis.asyncio import Redis

from core import keys

log = logging.getLogger(__name__)
RECONNECT_MAX_S = 30.0


class Polls(Protocol):
    async def get_and_submit_flow_runs(self) -> list[Any]: ...


class Nudges:
    def __init__(self, worker: Polls, pool: str) -> None:
        self.worker = worker
        self.pool = pool
        self.polls = 0  # polls run for nudges, for tests and logs
        self._polling: asyncio.Task[None] | None = None
        self._again = False

    async def follow(self, redis_url: str) -> None:
        """Runs until cancelled. Redis unavailable is waited out (with backoff, logged
        once): the worker's own polls go on meanwhile."""
        wait = 0.5
        while True:
            redis = Redis.from_url(redis_url, decode_responses=True)
            try:
                async with redis.pubsub() as pubsub:
                    await pubsub.subscribe(keys.WORKER_NUDGES_CHANNEL)
                    wait = 0.5
                    async for message in pubsub.listen():
                        if message["type"] == "message" and message["data"] == self.pool:
                            self.nudge()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if wait == 0.5:
                    log.warning("worker nudges: Redis unavailable (%s); the worker's own "
                                "polls go on", exc)
                await asyncio.sleep(wait)
                wait = min(wait * 2, RECONNECT_MAX_S)
            finally:
                await redis.aclose()
                await self._settle()

    def nudge(self) -> None:
        if self._polling is not None and not self._polling.done():
            self._again = True
            return
        self._polling = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            self._again = False
            self.polls += 1
            try:
                await self.worker.get_and_submit_flow_runs()
            except Exception:
                # Prefect unreachable, say: the worker's own loop meets and reports it too.
                log.exception("worker nudges: a poll failed")
            if not self._again:
                return

    async def _settle(self) -> None:
        """Leaves no poll running past `follow`: a run being submitted is not cut."""
        if self._polling is not None and not self._polling.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._polling)


def follow_nudges_in(worker_class: type[Any], redis_url: str, pool: str) -> None:
    """Makes every `worker_class(...).start()` for work pool `pool` follow the nudges while
    it runs (Prefect's CLI builds the worker and calls `start`; there is no other hook)."""
    start: Callable[..., Awaitable[Any]] = worker_class.start

    async def start_following(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "_work_pool_name", None) != pool:
            return await start(self, *args, **kwargs)
        following = asyncio.create_task(Nudges(self, pool).follow(redis_url))
        try:
            return await start(self, *args, **kwargs)
        finally:
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await following

    worker_class.start = start_following
