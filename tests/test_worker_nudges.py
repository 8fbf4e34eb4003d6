"""The worker's nudges (pipelines/worker_nudges.py) on the real Redis: a nudge for its work pool
makes the worker poll at once, others do not, and nudges during a poll fold into one more.

The worker here stands in for Prefect's (its `get_and_submit_flow_runs` counts calls): what
is tested is the following of the channel. That the stack's real worker starts a nudged run
at once is what `make bench-e2e` shows (its floor's runs are nudged alike), and the commands
consumer's side is in test_consumers_commands.py.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from yarl import URL

from core import keys
from core.settings import Settings
from pipelines import worker_nudges
from pipelines.worker_nudges import MIN_GAP_S, Nudges, follow_nudges_in
from tests.conftest import eventually
from tests.tcp_proxy import TcpProxy


class Worker:
    """Prefect's worker as the nudges see it."""

    def __init__(self, pool: str) -> None:
        self._work_pool_name = pool
        self.polls = 0
        self.release = asyncio.Event()
        self.release.set()

    async def get_and_submit_flow_runs(self) -> list[Any]:
        self.polls += 1
        await self.release.wait()
        return []


async def _subscribers(redis: Redis) -> int:
    [(_, count)] = await redis.pubsub_numsub(keys.WORKER_NUDGES_CHANNEL)
    return int(count)


@pytest.fixture
async def following(test_settings: Settings, redis: Redis) -> AsyncIterator[tuple[Nudges, str]]:
    """A worker of a pool of its own following the channel (pub/sub is server-wide: the
    stack's worker, on another pool, may follow it too)."""
    pool = f"test-pool-{uuid.uuid4().hex[:8]}"
    before = await _subscribers(redis)
    nudges = Nudges(Worker(pool), pool)
    task = asyncio.create_task(nudges.follow(test_settings.redis_url))
    try:
        await eventually(lambda: _subscribers_above(redis, before))
        yield nudges, pool
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _subscribers_above(redis: Redis, count: int) -> bool:
    return await _subscribers(redis) > count


async def test_a_nudge_for_its_pool_makes_the_worker_poll(following: tuple[Nudges, str],
                                                          redis: Redis) -> None:
    nudges, pool = following
    await redis.publish(keys.WORKER_NUDGES_CHANNEL, f"{pool}-other")
    await redis.publish(keys.WORKER_NUDGES_CHANNEL, pool)
    # Messages arrive in order: once the pool's nudge polled, the other pool's was seen.
    await eventually(lambda: nudges.polls >= 1)
    assert nudges.polls == 1
    assert nudges.worker.polls == 1  # type: ignore[attr-defined]


async def test_nudges_during_a_poll_fold_into_one_more(following: tuple[Nudges, str],
                                                       redis: Redis) -> None:
    nudges, pool = following
    worker: Worker = nudges.worker  # type: ignore[assignment]
    worker.release.clear()  # the first poll hangs until released
    await redis.publish(keys.WORKER_NUDGES_CHANNEL, pool)
    await eventually(lambda: worker.polls == 1)
    for _ in range(5):
        await redis.publish(keys.WORKER_NUDGES_CHANNEL, pool)
    # The last of them reached the follower (and was folded) once a later sentinel did.
    await redis.publish(keys.WORKER_NUDGES_CHANNEL, f"{pool}-sentinel")
    await eventually(lambda: nudges._again)
    assert worker.polls == 1
    worker.release.set()
    await eventually(lambda: worker.polls == 2 and nudges._polling is not None
                     and nudges._polling.done())
    assert nudges.polls == 2


async def test_a_failing_poll_is_logged_and_the_next_nudge_polls_again(
        following: tuple[Nudges, str], redis: Redis) -> None:
    nudges, pool = following

    async def unreachable() -> list[Any]:
        nudges.polls_failed = getattr(nudges, "polls_failed", 0) + 1  # type: ignore[attr-defined]
        raise ConnectionError("Prefect unreachable")

    nudges.worker.get_and_submit_flow_runs = unreachable  # type: ignore[method-assign]
    await redis.publish(keys.WORKER_NUDGES_CHANNEL, pool)
    await eventually(lambda: getattr(nudges, "polls_failed", 0) == 1)
    await eventually(lambda: nudges._polling is not None and nudges._polling.done())
    await redis.publish(keys.WORKER_NUDGES_CHANNEL, pool)
    await eventually(lambda: getattr(nudges, "polls_failed", 0) == 2)


async def test_a_started_worker_of_the_pool_follows_the_nudges_while_it_runs(
        test_settings: Settings, redis: Redis) -> None:
    pool = f"test-pool-{uuid.uuid4().hex[:8]}"

    class Started(Worker):
        async def start(self) -> str:
            # Prefect's worker runs its loops here until it is stopped.
            async def nudge() -> bool:
                await redis.publish(keys.WORKER_NUDGES_CHANNEL, pool)
                return self.polls > 0
            await eventually(nudge, timeout=10, interval=0.1)
            return "stopped"

    class Other(Worker):
        async def start(self) -> int:
            return len(asyncio.all_tasks())

    follow_nudges_in(Started, test_settings.redis_url, pool)
    before = await _subscribers(redis)
    assert await Started(pool).start() == "stopped"
    # Once start returned, the worker stopped following.
    await eventually(lambda: _subscribers_at_most(redis, before))
    # A worker of another pool is left as it is: no follower beside its start.
    follow_nudges_in(Other, test_settings.redis_url, pool)
    assert await Other(f"{pool}-other").start() == len(asyncio.all_tasks())
    assert await Other(pool).start() == len(asyncio.all_tasks()) + 1


async def _subscribers_at_most(redis: Redis, count: int) -> bool:
    return await _subscribers(redis) <= count


async def test_a_follower_whose_connection_is_killed_subscribes_again(
        following: tuple[Nudges, str], redis: Redis) -> None:
    nudges, pool = following
    clients = await redis.client_list()
    [mine] = [c["id"] for c in clients if c.get("name") == f"dhub-worker-nudges:{pool}"]
    await redis.client_kill_filter(_id=mine)

    async def nudged() -> bool:
        await redis.publish(keys.WORKER_NUDGES_CHANNEL, pool)
        return nudges.polls > 0
    await eventually(nudged, timeout=15, interval=0.2)


async def test_a_follower_whose_connection_goes_silent_subscribes_again(
        test_settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection that drops every byte without closing (a NAT or a load balancer that
    forgot the flow) raises nothing on a subscriber: without its PINGs the follower would wait
    on it for ever while the worker fell back to its slow poll. Through a proxy that goes
    silent, it notices within three PING intervals and subscribes again."""
    monkeypatch.setattr(worker_nudges, "PING_S", 0.3)
    url = URL(test_settings.redis_url)
    pool = f"test-pool-{uuid.uuid4().hex[:8]}"
    nudges = Nudges(Worker(pool), pool)
    async with TcpProxy(url.host or "127.0.0.1", url.port or 6379) as proxy:
        task = asyncio.create_task(nudges.follow(str(url.with_port(proxy.port))))
        try:
            await eventually(lambda: len(proxy.links) == 1)

            async def nudged() -> bool:
                await redis.publish(keys.WORKER_NUDGES_CHANNEL, pool)
                return nudges.polls > 0
            await eventually(nudged, interval=0.1)
            assert proxy.blackhole() == 1  # from now on, silence on the first connection
            await asyncio.sleep(0.3)  # a nudge already on its way may still arrive
            before = nudges.polls

            async def nudged_again() -> bool:
                await redis.publish(keys.WORKER_NUDGES_CHANNEL, pool)
                return nudges.polls > before
            await eventually(nudged_again, timeout=10, interval=0.2)
            assert len(proxy.links) >= 2  # heard again only over a new connection
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_polls_for_a_stream_of_nudges_start_apart(following: tuple[Nudges, str]) -> None:
    nudges, _ = following
    worker: Worker = nudges.worker  # type: ignore[assignment]
    starts: list[float] = []

    async def poll() -> list[Any]:
        starts.append(asyncio.get_running_loop().time())
        return []

    worker.get_and_submit_flow_runs = poll  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    end = loop.time() + 0.5
    while loop.time() < end:  # nudged far faster than polls may start
        nudges.nudge()
        await asyncio.sleep(0.005)
    await eventually(lambda: nudges._polling is not None and nudges._polling.done())
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(starts) >= 3
    assert min(gaps) >= MIN_GAP_S * 0.9  # the loop's clock granularity
