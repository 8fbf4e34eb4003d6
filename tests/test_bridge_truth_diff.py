"""The rebuild's dry-run check (`core.state_diff.compare`) saying `equal` only when the
rebuilt Redis answers as the live one does (found by review, failing before its fix)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

import pytest
from redis.asyncio import Redis

from core import keys
from core.models import new_batch_id
from core.registry import PipelineRegistry
from core.scripts import Scripts
from core.state_diff import compare
from core.store import BatchStore
from tests.conftest import PrivateRedis
from tests.helpers import spec

P = "diff-truth"


@pytest.fixture
async def rebuilt(private_redis: PrivateRedis) -> AsyncIterator[Redis]:
    client = Redis.from_url(private_redis.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def same_batch_in_both(source: Redis, rebuilt: Redis) -> str:
    """One batch, created alike in both (the rebuilt one as a restore writes it)."""
    batch_id = new_batch_id()
    for redis in (source, rebuilt):
        await PipelineRegistry(redis, Scripts(redis)).register(P, spec())
        await BatchStore(redis, Scripts(redis), token_secret=b"s").create(P, batch_id, spec())
    # Creation times differ by a few microseconds: the restored hash is the source's.
    fields = cast(dict[str, str], await source.hgetall(keys.batch(P, batch_id)))
    await rebuilt.hset(keys.batch(P, batch_id), items=[v for kv in fields.items() for v in kv])
    assert (await compare(source, rebuilt)).equal
    return batch_id


@pytest.mark.parametrize("lost", ["batch_index", "batch_state_index"])
async def test_a_batch_the_rebuilt_redis_does_not_list_is_no_equal(
        redis: Redis, rebuilt: Redis, lost: str) -> None:
    """The check compared the hashes of the batches the live Redis lists, and only those
    the rebuilt one listed beyond them: a rebuilt Redis holding a batch's hash but not
    listing it (GET of its list, or of its `state=pending` filter, leaves it out) was
    reported equal, and the dry run passed."""
    batch_id = await same_batch_in_both(redis, rebuilt)
    await redis.set(keys.batch_indexes_built(P), "1")  # the live one served a filtered page
    index = (keys.batch_index(P) if lost == "batch_index"
             else keys.batch_state_index(P, "pending"))
    assert await rebuilt.zrem(index, batch_id) == 1
    diff = await compare(redis, rebuilt)
    assert not diff.equal, diff


async def test_filter_indexes_the_live_redis_has_not_built_yet_are_no_difference(
        redis: Redis, rebuilt: Redis) -> None:
    """The live Redis puts batches from before its filter indexes in them at the pipeline's
    first filtered page; a rebuild does it at once. Until then the dry run reported every
    such batch as indexed in the rebuilt copy only, and failed, though GET answers alike."""
    batch_id = await same_batch_in_both(redis, rebuilt)
    assert await redis.zrem(keys.batch_state_index(P, "pending"), batch_id) == 1
    assert (await compare(redis, rebuilt)).equal
    await redis.set(keys.batch_indexes_built(P), "1")  # built, and still without it: a lie
    assert not (await compare(redis, rebuilt)).equal
