"""The stack's Prefect worker starts a flow run as soon as the commands consumer says it
created one (`keys.WORKER_NUDGES_CHANNEL`), instead of at its next poll.

A process worker only learns of scheduled runs by polling Prefect every
PREFECT_WORKER_QUERY_SECONDS, so a run waited half an interval on average before it was
picked up. A nudge makes the worker run its own poll (`get_and_submit_flow_runs`) at once.
The worker's polling loop goes on unchanged: it picks up whatever a lost nudge, a Redis
outage or a run created elsewhere leaves. A poll running beside the loop's is safe: the worker
submits a run only once (it checks and marks the run's id with no await in between), and
Prefect lets a Scheduled run become Pending only once.

Nudges that arrive while a poll runs are folded into one more poll after it, and polls for
nudges start at least MIN_GAP_S apart. The subscription is PINGed, so a connection gone
silently is noticed and made again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from redis.asyncio import Redis

from core import keys
from core.redis_connection import connection_class

log = logging.getLogger(__name__)
RECONNECT_MAX_S = 30.0
# The subscription is PINGed this often, and a connection that has answered nothing for
# PING_S * 3 is dropped and made again: a peer gone silently would otherwise leave the worker
# on its slow poll, unknown to anyone.
PING_S = 5.0
# Polls for nudges start at least this far apart: a burst of runs created is a burst of
# nudges, and each poll costs the Prefect server a query and two updates.
MIN_GAP_S = 0.1
# How long a stopping worker waits for the follower to end.
STOP_WAIT_S = 5.0


class Polls(Protocol):
    async def get_and_submit_flow_runs(self) -> list[Any]: ...


class Nudges:
    def __init__(self, worker: Polls, pool: str) -> None:
        self.worker = worker
        self.pool = pool
        self.polls = 0  # polls run for nudges (read by the tests)
        self.stopped = False  # set once the worker stops: later nudges poll nothing
        self._polling: asyncio.Task[None] | None = None
        self._again = False
        self._last_start = float("-inf")  # when the last poll for a nudge started

    async def follow(self, redis_url: str) -> None:
        """Runs until cancelled. Redis unavailable is waited out (with backoff, logged
        once): the worker's own polls go on meanwhile."""
        wait = 0.5
        while True:
            redis = Redis.from_url(redis_url, connection_class=connection_class(redis_url),
                                   decode_responses=True,
                                   client_name=f"dhub-worker-nudges:{self.pool}")
            try:
                async with redis.pubsub() as pubsub:
                    await pubsub.subscribe(keys.WORKER_NUDGES_CHANNEL)
                    heard = pinged = time.monotonic()
                    while True:
                        message = await pubsub.get_message(timeout=PING_S)
                        now = time.monotonic()
                        if message is not None:
                            heard = now
                            if message["type"] == "subscribe":
                                wait = 0.5  # subscribed: a later failure is a new one
                            elif message["type"] == "message" and message["data"] == self.pool:
                                self.nudge()
                        if now - heard > 3 * PING_S:
                            raise ConnectionError(f"no answer from Redis in {now - heard:.0f} s")
                        if now - pinged >= PING_S:
                            await pubsub.ping()
                            pinged = now
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
        if self.stopped:
            return
        if self._polling is not None and not self._polling.done():
            self._again = True
            return
        self._polling = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            # Nudges meanwhile fold into this poll (the task is not done).
            await asyncio.sleep(max(0.0, self._last_start + MIN_GAP_S - time.monotonic()))
            if self.stopped:
                return
            self._again = False
            self._last_start = time.monotonic()
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
        nudges = Nudges(self, pool)
        following = asyncio.create_task(nudges.follow(redis_url))
        try:
            return await start(self, *args, **kwargs)
        finally:
            nudges.stopped = True
            following.cancel()
            # Bounded, and never cancelling it again: nothing in Redis holds the worker's exit.
            done, _ = await asyncio.wait([following], timeout=STOP_WAIT_S)
            if not done:
                log.warning("worker nudges: the follower did not stop within %.0f s; the "
                            "worker exits without it", STOP_WAIT_S)
            elif not following.cancelled() and (error := following.exception()) is not None:
                log.warning("worker nudges: the follower failed: %r", error)

    worker_class.start = start_following
