"""CREATE_LATEST_BATCH's unsent-runs entry and SWEEP_UNSENT (core/api_scripts.py) on a real
Redis, and the abandoner's sweep around them with a stand-in for Kafka: an entry is written
with the batch, taken only once its lease passed (Redis's clock) and only while its batch is
`pending` and visible; a send Kafka does not take loses nothing."""

from __future__ import annotations

import asyncio
from typing import cast

import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from core import keys
from core.api_scripts import ApiScripts
from core.codec import Command, Delete, Run
from core.command_messages import Recorded
from core.registry import PipelineRegistry
from core.scripts import Scripts
from core.store import BatchStore
from service import creates
from service.abandon import Abandoner
from service.command_sender import CommandSender
from tests.conftest import eventually
from tests.helpers import spec

UNSENT = keys.unsent_runs("p")


class _Kafka:
    """Stands in for the command sender: what would go to Kafka; `down` refuses sends."""

    def __init__(self) -> None:
        self.commands: list[Command] = []
        self.available = True
        self.down = False

    async def command(self, command: Command) -> None:
        if self.down:
            raise ConnectionError("Kafka away")
        self.commands.append(command)


async def _created(redis: Redis, batch_id: str) -> creates.Created:
    """A batch created as a POST creates it (its run command then never sent)."""
    scripts = Scripts(redis)
    registry = PipelineRegistry(redis, scripts)
    await registry.register("p", spec())
    store = BatchStore(redis, scripts, token_secret=b"t", changes_channel="")
    return await creates.record(store, ApiScripts(redis), registry, "p", batch_id, spec(),
                                True)


def _abandoner(redis: Redis, kafka: _Kafka, lease_s: float) -> Abandoner:
    store = BatchStore(redis, Scripts(redis), token_secret=b"t", changes_channel="")
    return Abandoner(redis, ApiScripts(redis), cast(CommandSender, kafka), purge=store.purge,
                     lease_s=lease_s, idle_s=0.05)


async def _sweep(s: ApiScripts, lease_ms: int) -> list[str]:
    return cast(list[str], await s.sweep_unsent(keys=[UNSENT],
                                                args=[keys.batch("p", ""), lease_ms, 100]))


async def test_the_create_enters_its_batch_and_the_sweep_waits_for_the_lease(
        redis: Redis) -> None:
    s = ApiScripts(redis)
    await _created(redis, "batch-a")
    entered = await redis.zscore(UNSENT, "batch-a")
    seconds, micros = await redis.time()
    assert entered is not None and abs(entered - (seconds * 1000 + micros // 1000)) < 5_000
    # A batch that existed already is not entered again (nothing was created).
    await redis.zrem(UNSENT, "batch-a")
    with pytest.raises(creates.NotThisRequests):
        await _created(redis, "batch-a")
    assert await redis.zscore(UNSENT, "batch-a") is None
    await _created(redis, "batch-b")
    assert await _sweep(s, 60_000) == []  # its lease runs: a live POST may still send it
    assert await _sweep(s, 0) == ["batch-b"]
    # Claimed: its time is now, so another process's sweep leaves it for another lease.
    assert await _sweep(s, 60_000) == []
    assert await redis.zscore(UNSENT, "batch-b") is not None


async def test_a_create_not_the_posts_is_entered_before_it(redis: Redis) -> None:
    s = ApiScripts(redis)
    assert await s.enter_unsent(keys=[UNSENT], args=["batch-r"]) == 1
    entered = await redis.zscore(UNSENT, "batch-r")
    assert await s.enter_unsent(keys=[UNSENT], args=["batch-r"]) == 0
    assert await redis.zscore(UNSENT, "batch-r") == entered  # not pushed back
    # Its create never came (refused, or the process died first): dropped, nothing sent.
    assert await _sweep(s, 0) == []
    assert await redis.zcard(UNSENT) == 0


async def test_the_sweep_drops_batches_taken_hidden_or_purged(redis: Redis) -> None:
    s = ApiScripts(redis)
    for batch_id in ("batch-run", "batch-hidden", "batch-gone", "batch-stopped", "batch-new"):
        await _created(redis, batch_id)
    await redis.hset(keys.batch("p", "batch-run"), "state", "running")
    await redis.hset(keys.batch("p", "batch-stopped"), "state", "stop")
    await redis.hset(keys.batch("p", "batch-hidden"), "deleted", "1")
    await redis.delete(keys.batch("p", "batch-gone"))
    assert await _sweep(s, 0) == ["batch-new"]
    assert await redis.zrange(UNSENT, 0, -1) == ["batch-new"]


async def test_the_sweep_sends_the_run_command_the_post_would_have_sent(redis: Redis) -> None:
    created = await _created(redis, "batch-a")
    kafka = _Kafka()
    abandoner = _abandoner(redis, kafka, lease_s=0)
    assert await abandoner.sweep_once() == 1
    [command] = kafka.commands
    assert isinstance(command, Run)
    assert (command.batch_id, command.pipeline_id, command.pipeline_version,
            command.event_id) == ("batch-a", "p", "1", "run-batch-a")
    # What a rebuild restores it from: as its POST recorded it (the fresh batch's own step
    # fields too, which a rebuild's create writes alike).
    recorded = command.recorded
    assert isinstance(recorded, Recorded)
    assert (recorded.seq, recorded.created_at) == (created.recorded.seq,
                                                   created.recorded.created_at)
    assert created.recorded.extra.items() <= recorded.extra.items()
    assert await redis.zcard(UNSENT) == 0
    assert await abandoner.sweep_once() == 0  # sent once


async def test_a_sent_batch_leaves_the_set_without_a_sweep(redis: Redis) -> None:
    await _created(redis, "batch-a")
    kafka = _Kafka()
    abandoner = _abandoner(redis, kafka, lease_s=0)
    abandoner.sent("p", "batch-a")
    assert await abandoner.sweep_once() == 0
    assert kafka.commands == [] and await redis.zcard(UNSENT) == 0


async def test_kafka_or_redis_away_during_the_sweep_loses_nothing(redis: Redis) -> None:
    await _created(redis, "batch-a")
    kafka = _Kafka()
    abandoner = _abandoner(redis, kafka, lease_s=0)
    kafka.down = True
    with pytest.raises(ConnectionError):
        await abandoner.sweep_once()
    assert await redis.zscore(UNSENT, "batch-a") is not None  # kept, due again at once
    kafka.down = False
    assert await abandoner.sweep_once() == 1
    # Acked entries whose removal Redis did not take are removed at a later round.
    await _created(redis, "batch-b")
    unreachable = Redis(port=1, socket_connect_timeout=0.2)
    away = Abandoner(unreachable, ApiScripts(redis), cast(CommandSender, kafka), lease_s=3600)
    away.sent("p", "batch-b")
    try:
        with pytest.raises(RedisConnectionError):
            await away.sweep_once()
    finally:
        await unreachable.aclose()
    away._redis = away.unsent._redis = redis
    assert await away.sweep_once() == 0
    assert await redis.zcard(UNSENT) == 0


async def test_an_undone_create_leaves_the_set(redis: Redis) -> None:
    await _created(redis, "batch-a")
    abandoner = _abandoner(redis, _Kafka(), lease_s=3600)
    await abandoner.undo("p", "batch-a")
    assert await redis.zcard(UNSENT) == 0
    assert not await redis.exists(keys.batch("p", "batch-a"))


async def test_the_loop_sweeps_and_a_batch_taken_meanwhile_is_not_sent(redis: Redis) -> None:
    await _created(redis, "batch-a")
    await _created(redis, "batch-b")
    kafka = _Kafka()
    abandoner = _abandoner(redis, kafka, lease_s=0.2)
    # Its run command was taken by the consumer (from a send whose ack the process never saw).
    await redis.hset(keys.batch("p", "batch-b"), "state", "scheduled")
    task = asyncio.create_task(abandoner.run())
    try:
        async def swept() -> bool:
            return await redis.zcard(UNSENT) == 0

        assert await eventually(swept, timeout=10)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert [c.batch_id for c in kafka.commands] == ["batch-a"]


async def test_a_batch_deleted_while_its_run_was_sent_again_gets_a_delete_behind_it(
        redis: Redis) -> None:
    await _created(redis, "batch-a")

    class _DeletedMeanwhile(_Kafka):
        async def command(self, command: Command) -> None:
            # A DELETE between the sweep's read and its send: its delete went first.
            await redis.hset(keys.batch("p", "batch-a"), "deleted", "1")
            await super().command(command)

    kafka = _DeletedMeanwhile()
    abandoner = _abandoner(redis, kafka, lease_s=0)
    assert await abandoner.sweep_once() == 1
    kafka.down = False
    assert await abandoner.drain_once() == 1
    assert [(c.type, c.batch_id) for c in kafka.commands] == [("run", "batch-a"),
                                                              ("delete", "batch-a")]
    [delete] = [c for c in kafka.commands if isinstance(c, Delete)]
    assert delete.abandoned is not True  # the DELETE's: no Idempotency-Key was released


async def test_an_undo_that_waited_past_a_sweep_abandons_the_batch_a_consumer_took(
        redis: Redis) -> None:
    # Kafka refused the POST's run command and Redis was away for the undo (a partition of
    # that API process): the undo waits in its memory, while another process's sweep sent
    # the run command after the lease and a consumer took it.
    await _created(redis, "batch-a")
    abandoner = _abandoner(redis, _Kafka(), lease_s=3600)
    abandoner._undone[("p", "batch-a")] = None
    await redis.hset(keys.batch("p", "batch-a"), "state", "scheduled")
    await abandoner._undo_pending()
    # Purged, its flow run would run on with no batch; hidden and deleted, it is cancelled.
    assert await redis.hget(keys.batch("p", "batch-a"), "deleted") == "1"
    [member] = cast(list[str], await redis.zrange(keys.ABANDONED, 0, -1))
    assert orjson.loads(member)[:2] == ["p", "batch-a"]
    assert abandoner.undoing() == 0
