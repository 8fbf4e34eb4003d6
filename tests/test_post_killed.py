"""A POST with an Idempotency-Key whose API process died midway (SIGKILL, OOM), then the
client's retry with the same key once the first attempt's lease has passed: the key ends with
exactly one batch, the first attempt's, and it runs (its run command is on the topic).

The death is simulated in process: the first attempt's next step (its send, its commit, its
create) never returns, as a dead process's would not, so nothing of its own failure handling
runs; the retry comes through the same API (the pending record is all a new process would
see). That a run command sent again for a batch whose run was already created runs no second
flow run is the consumer's own test (test_consumers_commands.py:
test_run_creates_one_flow_run_even_when_delivered_twice)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from core import keys
from core.codec import decode_command
from core.settings import Settings
from service import creates
from service.appkeys import ABANDONER, COMMANDS, IDEMPOTENCY
from tests.conftest import eventually
from tests.helpers import AUTH, api_client, api_settings, read_topic, spec_body

Client = TestClient[Any, Any]
KEY = {**AUTH, "Idempotency-Key": "killed-1"}
LEASE_MS = 300


@contextlib.asynccontextmanager
async def registered_api(topics: Settings) -> AsyncIterator[Client]:
    """An in-process API on `topics` with pipeline `p` registered."""
    async with api_client(api_settings(topics)) as client:
        response = await client.put("/api/v1/pipelines/p", json=spec_body(), headers=AUTH)
        assert response.status == 201
        yield client


@pytest.fixture
async def api(topics: Settings, redis: Redis) -> AsyncIterator[Client]:
    async with registered_api(topics) as client:  # (redis: a flushed DB)
        # A short lease, so the retry need not wait a minute for the dead attempt's.
        client.app[IDEMPOTENCY]._pending_ttl_ms = LEASE_MS
        yield client


class Dies:
    """Wraps a step so that its first call never returns (the process died there); the
    calls after it (the retry's) go through."""

    def __init__(self, step: Callable[..., Awaitable[Any]], *, after: bool) -> None:
        self._step = step
        self._after = after  # the step itself happens before the death
        self.reached = asyncio.Event()
        self._buried = asyncio.Event()
        self._died = False

    def bury(self) -> None:
        """Lets the dead call end at the test's end (the server's shutdown waits for it): its
        step is done late, as a stalled process's would be."""
        self._buried.set()

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._died:
            return await self._step(*args, **kwargs)
        self._died = True
        if self._after:
            await self._step(*args, **kwargs)
        self.reached.set()
        await self._buried.wait()  # the process is gone: nothing after this is its
        return await self._step(*args, **kwargs)


async def batch_ids(redis: Redis) -> list[str]:
    return sorted(str(b) for b in await redis.zrange(keys.batch_index("p"), 0, -1))


async def run_commands(settings: Settings, batch_id: str) -> set[str]:
    def have(records: list[Any]) -> bool:
        return any(decode_command(r.value).batch_id == batch_id for r in records)

    records = await read_topic(settings, settings.topic_commands, have)
    return {decode_command(r.value).batch_id for r in records
            if decode_command(r.value).type == "run"}


async def first_dies(api: Client, dies: Dies) -> asyncio.Task[Any]:
    first = asyncio.create_task(api.post("/api/v1/batches/p", headers=KEY))
    await asyncio.wait_for(dies.reached.wait(), 10)
    return first


async def retried(api: Client, headers: dict[str, str] = KEY) -> str:
    """The retry, once the dead attempt's lease has passed (until then: 409 in_progress)."""
    async def accepted() -> str | None:
        response = await api.post("/api/v1/batches/p", headers=headers)
        body = await response.json()
        if response.status == 409 and body["error"]["code"] == "in_progress":
            return None
        assert response.status == 200, body
        return str(body["item"])

    return str(await eventually(accepted, timeout=15, interval=0.1))


async def test_killed_after_the_run_command_was_acked_the_retry_gets_that_batch(
        api: Client, redis: Redis, topics: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    keys_ = api.app[IDEMPOTENCY]
    dies = Dies(keys_.commit, after=False)
    monkeypatch.setattr(keys_, "commit", dies)
    first = await first_dies(api, dies)
    [first_id] = await batch_ids(redis)
    assert first_id in await run_commands(topics, first_id)  # acked: it will run
    try:
        again = await retried(api)
        assert again == first_id, "the key's one batch is the one whose run was queued"
        assert await batch_ids(redis) == [first_id]
        response = await api.post("/api/v1/batches/p", headers=KEY)
        assert (await response.json())["item"] == first_id
    finally:
        dies.bury()
        await first


async def test_killed_before_the_send_the_retry_runs_that_batch(
        api: Client, redis: Redis, topics: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    sender = api.app[COMMANDS]
    dies = Dies(sender.command, after=False)
    monkeypatch.setattr(sender, "command", dies)
    first = await first_dies(api, dies)
    [first_id] = await batch_ids(redis)  # created, pending, and no run command behind it
    try:
        again = await retried(api)
        assert again == first_id, "the pending batch is the key's, and now runs"
        assert await batch_ids(redis) == [first_id]
        assert first_id in await run_commands(topics, first_id)
        response = await api.get(f"/api/v1/batches/p/{first_id}", headers=AUTH)
        assert response.status == 200
    finally:
        dies.bury()
        await first


async def test_killed_before_the_create_the_retry_creates_and_runs_one_batch(
        api: Client, redis: Redis, topics: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    dies = Dies(creates.record, after=False)
    monkeypatch.setattr(creates, "record", dies)
    first = await first_dies(api, dies)
    assert await batch_ids(redis) == []
    try:
        again = await retried(api)
        assert await batch_ids(redis) == [again]
        assert again in await run_commands(topics, again)
        response = await api.post("/api/v1/batches/p", headers=KEY)
        assert (await response.json())["item"] == again
    finally:
        dies.bury()
        await first


async def test_a_retry_that_cannot_read_what_the_dead_attempt_left_keeps_the_key_pending(
        api: Client, redis: Redis, topics: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry took the key over, then its read of the dead attempt's batch failed (a
    failover). It released the key, though that batch's run command was on the topic: the
    next retry created and ran a second batch for the key."""
    keys_ = api.app[IDEMPOTENCY]
    dies = Dies(keys_.commit, after=False)
    monkeypatch.setattr(keys_, "commit", dies)
    first = await first_dies(api, dies)
    [first_id] = await batch_ids(redis)
    real = creates.left_behind
    failed = asyncio.Event()

    async def fails_once(*args: Any) -> creates.LeftBehind:
        if not failed.is_set():
            failed.set()
            raise RedisConnectionError("connection reset (a failover)")
        return await real(*args)

    monkeypatch.setattr(creates, "left_behind", fails_once)
    try:
        async def refused() -> bool:
            response = await api.post("/api/v1/batches/p", headers=KEY)
            return response.status == 503 and failed.is_set()
        await eventually(refused, timeout=15, interval=0.1)  # once the lease has passed
        again = await retried(api)
        assert again == first_id, "the key's one batch is the one whose run was queued"
        assert await batch_ids(redis) == [first_id]
    finally:
        dies.bury()
        await first


async def test_a_retry_finding_the_dead_attempts_batch_undone_says_so(
        api: Client, redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dead attempt's batch was undone before any answer (its create's reply lost, its
    release never taken). The retry answered that the key's batch "was deleted": no one
    deleted it, and the client was never told it existed."""
    sender = api.app[COMMANDS]
    dies = Dies(sender.command, after=False)
    monkeypatch.setattr(sender, "command", dies)
    first = await first_dies(api, dies)
    [first_id] = await batch_ids(redis)
    await api.app[ABANDONER].undo("p", first_id)
    try:
        async def answered() -> dict[str, Any] | None:
            response = await api.post("/api/v1/batches/p", headers=KEY)
            body: dict[str, Any] = await response.json()
            if response.status == 409 and body["error"]["code"] == "in_progress":
                return None
            assert response.status == 409, body
            return dict(body["error"])

        error = cast(dict[str, Any], await eventually(answered, timeout=15, interval=0.1))
        assert error["code"] == "conflict" and error["details"]["batch_id"] == first_id, error
        assert "was deleted" not in error["message"], error
        assert "undone" in error["message"] and "new key" in error["message"], error
        assert await batch_ids(redis) == []
    finally:
        dies.bury()
        await first
