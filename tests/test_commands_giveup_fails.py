"""A command whose give-up fails too (its batch's data breaks the script that records the
failure) is dead-lettered alone: the commands of other batches behind it on its partition
go on."""

from __future__ import annotations

import pytest
from aiokafka.partitioner import DefaultPartitioner
from redis.asyncio import Redis

from consumers.commands import CommandsConsumer
from consumers.plumbing import dlq
from core import keys
from core.settings import Settings
from tests.conftest import eventually
from tests.helpers import read_topic
from tests.test_consumers_support import (
    make_spec,
    new_batch,
    options,
    running,
    send_command,
    unique,
)

pytestmark = pytest.mark.timeout(90)


async def test_a_command_whose_give_up_fails_does_not_block_its_partition(
        topics: Settings, redis: Redis) -> None:
    pipeline_id = unique("test-giveup-fails")
    spec = make_spec(pipeline_id)
    partitioner = DefaultPartitioner()
    broken = await new_batch(redis, topics, pipeline_id, spec)
    target = partitioner(broken.encode(), [0, 1], [0, 1])
    while True:
        other = await new_batch(redis, topics, pipeline_id, spec)
        if partitioner(other.encode(), [0, 1], [0, 1]) == target:
            break
    # The events script fails on this batch (wrong type), for its stop and its `failed` alike.
    await redis.set(keys.batch_seen(pipeline_id, broken), "not a sorted set")

    async def stopped() -> bool:
        return await redis.hget(keys.batch(pipeline_id, other), "state") == "stop"

    async with running(CommandsConsumer(topics, options())) as consumer:
        command = await send_command(topics, "stop", pipeline_id, broken)
        await send_command(topics, "stop", pipeline_id, other)
        await eventually(stopped, timeout=25, interval=0.2)
        assert isinstance(consumer, CommandsConsumer)
        assert consumer.dlq.sent == {"gave_up": 1}
    [dead] = await read_topic(topics, topics.topic_dlq, lambda r: len(r) >= 1)
    assert dead.value == command.encode()
    reason = dict(dead.headers)[dlq.REASON].decode()
    assert reason.startswith("stop failed") and "giving it up failed too" in reason, reason
