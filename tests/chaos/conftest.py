"""The fault-injection suite (`make chaos`): runs only with DHUB_CHAOS=1, against the chaos
stack that `make chaos` starts on its own ports and state dir (never the shared one).

Without DHUB_CHAOS=1 nothing here is even collected, so `make test` does not see it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from redis.asyncio import Redis

from core.settings import Settings
from tests.chaos.engine import cancel_all
from tests.chaos.stackctl import ChaosStack, check_isolated
from tests.chaos.watch import client

ENABLED = os.environ.get("DHUB_CHAOS") == "1"
if not ENABLED:
    collect_ignore_glob = ["test_*.py"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ENABLED:
        return
    skip = pytest.mark.skip(reason="the chaos suite runs with `make chaos` (DHUB_CHAOS=1)")
    for item in items:
        if "tests/chaos/" in item.nodeid:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def chaos() -> Iterator[ChaosStack]:
    settings = Settings()  # read now: the DHUB_* of `make chaos`, not a cached copy
    if problem := check_isolated(settings):
        pytest.exit(problem, 3)
    stack = ChaosStack(settings)
    # A reused chaos stack (CHAOS_KEEP=1) may hold runs an interrupted scenario left waiting.
    if left := asyncio.run(cancel_leftovers(stack)):
        print(f"\ncancelled {left} flow runs left non-final by an earlier run")
    yield stack


@pytest.fixture(autouse=True)
def whole_stack(chaos: ChaosStack) -> None:
    """Every part up before each scenario (quick when they are): a scenario that failed
    half way must not leave a part down for the next one."""
    chaos.up()


@pytest.fixture
async def chaos_redis(chaos: ChaosStack) -> AsyncIterator[Redis]:
    # A plain client of the suite's own (not the project's): the harness must not change
    # while the code under test does.
    redis = Redis.from_url(chaos.settings.redis_url, decode_responses=True, socket_timeout=10)
    try:
        yield redis
    finally:
        await redis.aclose()


@pytest.fixture
async def http(chaos: ChaosStack) -> AsyncIterator[httpx.AsyncClient]:
    async with client(chaos.api, chaos.token) as session:
        yield session


async def cancel_leftovers(stack: ChaosStack) -> int:
    return await cancel_all(stack, "dhub")
