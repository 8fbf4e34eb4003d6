"""Fixtures on the real engines: Kafka, Redis and the Prefect server of the local stack.

The session fixture `stack` reuses the parts that already answer (a developer's `make up`, or
engines pointed at by DHUB_* env) and starts the missing ones with the project's own
`deploy/local/stack.py`; it stops at the end exactly what it started.
Isolation per test: a flushed Redis database (`DHUB_TEST_REDIS_DB`, default 15) and unique
Kafka topic names and consumer groups.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from redis.asyncio import Redis

from core.connections import open_redis
from core.scripts import Scripts
from core.settings import ROOT, Settings, get_settings

pytest_plugins = ["tests.kafka_proxy_fixture", "tests.hang_dump"]

STACK = [sys.executable, str(ROOT / "deploy" / "local" / "stack.py")]
ENGINE_PARTS = ("redis", "kafka", "postgres", "prefect", "worker", "engine-forks")

# Under `pytest -n N` (xdist, as `make test` runs) each worker flushes a Redis database of its
# own: the first worker the given one, the next the one below it, and so on.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER.startswith("gw"):
    # From the database given to the run, kept aside: this module may be imported again.
    _GIVEN = os.environ.setdefault("DHUB_TEST_REDIS_DB_GIVEN",
                                   os.environ.get("DHUB_TEST_REDIS_DB", "15"))
    os.environ["DHUB_TEST_REDIS_DB"] = str(int(_GIVEN) - int(_WORKER[2:]))
# Tests flush their database before and after each test: never the stack's own.
_STACK_DB = get_settings().redis_url.rsplit("/", 1)[-1] or "0"
if (int(os.environ.get("DHUB_TEST_REDIS_DB", "15")) < 0
        or os.environ.get("DHUB_TEST_REDIS_DB", "15") == _STACK_DB):
    raise pytest.UsageError(
        f"DHUB_TEST_REDIS_DB {os.environ.get('DHUB_TEST_REDIS_DB')} (less this worker's "
        f"number under -n) is the stack's own database or below 0: pick one above the "
        f"workers' count, not {_STACK_DB}")


def _part_ready(part: str, settings: Settings) -> bool:
    """Cheap readiness probes, so a running stack is reused without touching it."""

    if part == "redis":
        port = int(settings.redis_url.rsplit(":", 1)[1].split("/")[0])
        target = ("127.0.0.1", port)
    elif part == "kafka":
        host, port_s = settings.kafka_bootstrap.split(",")[0].rsplit(":", 1)
        target = (host, int(port_s))
    elif part == "postgres":
        target = ("127.0.0.1", settings.postgres_port)
    elif part == "prefect":
        try:
            return httpx.get(settings.prefect_api_url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
    elif part == "api":
        try:
            url = f"http://{settings.api_host}:{settings.api_port}/healthz"
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
    else:
        # The worker and the consumers have no port: ask the stack script.
        out = subprocess.run([*STACK, "status", "--parts", part], capture_output=True, text=True)
        return out.returncode == 0 and " up" in out.stdout
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(target) == 0


@contextmanager
def _parts_up(parts: tuple[str, ...], settings: Settings) -> Iterator[None]:
    """Reuses the parts that answer; starts the others and stops exactly those afterwards."""
    missing = [p for p in parts if not _part_ready(p, settings)]
    ours: list[str] = []
    if missing:
        up = subprocess.run([*STACK, "up", "--parts", *missing], text=True, capture_output=True)
        sys.stdout.write(up.stdout)
        # Only what this `up` spawned is ours to stop: a part that merely looked missing
        # (slow to answer, or being started by a concurrent run) belongs to someone else.
        ours = [p for p in missing if re.search(rf"^{p}\s+started in", up.stdout, re.MULTILINE)]
        if up.returncode != 0:
            subprocess.run([*STACK, "down", "--parts", *ours])
            pytest.exit(f"the local stack did not start ({missing}); see .dhub/logs/", 3)
    try:
        yield
    finally:
        if ours:
            subprocess.run([*STACK, "down", "--parts", *ours], check=False)


def pytest_configure(config: pytest.Config) -> None:
    """Under `pytest -n N` the controller brings the whole stack up once, before its workers
    start (each would otherwise race the others to start the same parts), and stops what it
    started at the end; the workers' fixtures then find every part running."""
    if _WORKER or not getattr(config.option, "numprocesses", None):
        return
    parts = contextlib.ExitStack()
    parts.enter_context(_parts_up((*ENGINE_PARTS, "api", "consumers"), get_settings()))
    config.add_cleanup(parts.close)


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    settings = get_settings()
    with _parts_up(ENGINE_PARTS, settings):
        yield settings


@pytest.fixture
def test_settings(stack: Settings) -> Settings:
    """Settings for one test: its own Redis database, topics and consumer groups."""
    suffix = uuid.uuid4().hex[:10]
    db = int(os.environ.get("DHUB_TEST_REDIS_DB", "15"))
    base_url = stack.redis_url.rsplit("/", 1)[0]
    return stack.model_copy(
        update={
            "redis_url": f"{base_url}/{db}",
            "topic_commands": f"test.{suffix}.commands",
            "topic_events": f"test.{suffix}.events",
            "topic_dlq": f"test.{suffix}.dlq",
            "group_commands": f"test-{suffix}-commands",
            "group_events": f"test-{suffix}-events",
            "commands_partitions": 2,
            "events_partitions": 2,
            "api_tokens": [],
            "api_token": None,
        }
    )


@pytest.fixture
async def redis(test_settings: Settings) -> AsyncIterator[Redis]:
    client = await open_redis(test_settings)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.flushdb()
        await client.aclose()


@pytest.fixture
def scripts(redis: Redis) -> Scripts:
    return Scripts(redis)


@pytest.fixture
async def topics(test_settings: Settings) -> AsyncIterator[Settings]:
    """Creates the test's own topics (the compacted ones compacted, as the stack makes them)
    and deletes them afterwards. Yields the settings naming them."""
    suffix = test_settings.topic_commands.split(".")[1]
    settings = test_settings.model_copy(update={
        "topic_pipelines": f"test.{suffix}.pipelines",
        "topic_snapshots": f"test.{suffix}.snapshots",
        "snapshots_partitions": 2,
    })
    compacted = {"cleanup.policy": "compact"}
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    names = [settings.topic_commands, settings.topic_events, settings.topic_dlq,
             settings.topic_pipelines, settings.topic_snapshots]
    try:
        await admin.create_topics(
            [
                NewTopic(settings.topic_commands, settings.commands_partitions, 1),
                NewTopic(settings.topic_events, settings.events_partitions, 1),
                NewTopic(settings.topic_dlq, 1, 1),
                NewTopic(settings.topic_pipelines, 1, 1, topic_configs=compacted),
                NewTopic(settings.topic_snapshots, settings.snapshots_partitions, 1,
                         topic_configs=compacted),
            ]
        )
        yield settings
    finally:
        try:
            await admin.delete_topics(names)
        finally:
            await admin.close()


async def eventually(check: object, timeout: float = 10.0, interval: float = 0.05) -> object:
    """Polls `check` (a sync or async callable) until it returns a truthy value or time runs out."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()  # type: ignore[operator]
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def live(stack: Settings) -> Iterator[Settings]:
    """The whole stack as a user runs it: the engines plus the API and consumer processes
    (reused when running, else started and stopped afterwards). Tests on it use the stack's
    own settings (Redis db 0, the real topics) and unique pipeline ids."""
    with _parts_up(("api", "consumers"), stack):
        yield stack


# -- a Redis of one test's own: free to be made read-only, full, busy or killed ----------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class PrivateRedis:
    """A redis-server of this test only, free to be made read-only, full or busy."""

    port: int
    process: subprocess.Popen[bytes]
    directory: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture
async def private_redis() -> AsyncIterator[PrivateRedis]:
    directory = Path(tempfile.mkdtemp(prefix="dhub-test-redis-"))
    server: PrivateRedis | None = None
    try:
        for _ in range(5):  # a free port can be taken between the probe and the bind
            port = free_port()
            process = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir",
                 str(directory), "--save", "", "--appendonly", "no",
                 "--logfile", str(directory / "redis.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            client = Redis(port=port, socket_connect_timeout=1)
            try:
                async def up(c: Redis = client) -> bool:
                    with contextlib.suppress(Exception):
                        return bool(await c.ping())
                    return False
                await eventually(up, timeout=10, interval=0.05)
                server = PrivateRedis(port, process, directory)
                break
            except AssertionError:
                process.kill()
                process.wait()
            finally:
                await client.aclose()
        assert server is not None, "private redis-server did not start"
        yield server
    finally:
        if server is not None:
            server.process.terminate()
            server.process.wait(10)
        shutil.rmtree(directory, ignore_errors=True)
