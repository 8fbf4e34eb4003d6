"""PACK and UNPACK (core.pack_scripts) on a real Redis: each writes only over the hash it
was computed from (compare-and-set). That they publish nothing: tests/test_store_packing.py."""

from __future__ import annotations

import random
from typing import Any, cast

import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from core.pack_scripts import HASHES, PACK, UNPACK
from core.packing import PACKED, pack, unpacked
from tests.test_packing import finished

KEY = "dhub:{pipe}:batch:batch-1"
# Lua's unpack() in Redis takes fewer than 8,000 values: 3 steps of this many partitions with
# their totals are 4,020 fields, just past it.
LARGE = 670


async def pack_call(redis: Redis, read: dict[str, str], key: str = KEY, **change: Any) -> int:
    """PACK as core.store calls it, with the hash as `read` (possibly not what Redis holds)."""
    args: list[str | int] = [change.get("rev", read["rev"]), change.get("count", len(read)),
                             pack(read)[PACKED]]
    [done] = await redis.eval(PACK, 1, key, *args)
    return int(done)


async def unpack_call(redis: Redis, read: dict[str, str], value: str | None = None) -> int:
    full = unpacked(read)
    args: list[str | bytes] = [
        value or read[PACKED], orjson.dumps({name: v for name, v in full.items() if name not in read})]
    [done] = await redis.eval(UNPACK, 1, KEY, *args)
    return int(done)


async def put(redis: Redis, fields: dict[str, str]) -> None:
    await redis.hset(KEY, mapping=cast(Any, fields))


async def stored(redis: Redis) -> dict[str, str]:
    return cast(dict[str, str], await redis.hgetall(KEY))


@pytest.fixture
async def batch(redis: Redis) -> dict[str, str]:
    fields = finished(random.Random(7))
    await put(redis, fields)
    return fields


async def test_pack_replaces_the_packed_fields_and_unpack_restores_them(
        redis: Redis, batch: dict[str, str]) -> None:
    assert await pack_call(redis, batch) == 1
    held = await stored(redis)
    assert held == pack(batch)
    assert unpacked(held) == batch
    assert await unpack_call(redis, held) == 1
    assert await stored(redis) == batch


async def test_pack_leaves_a_hash_changed_since_it_was_read(redis: Redis,
                                                          batch: dict[str, str]) -> None:
    # An event applied meanwhile bumped rev.
    await put(redis, {"rev": "42", "off:load:partition_0": "1"})
    assert await pack_call(redis, batch) == 0
    # A field dropped without a bump (a stopped batch's seen_n): the count differs.
    await redis.hset(KEY, "rev", batch["rev"])
    await redis.hdel(KEY, "moved:load")
    assert await pack_call(redis, batch) == 0
    assert PACKED not in await stored(redis)


@pytest.mark.parametrize("change", [{"state": "running"}, {"deleted": "1"}])
async def test_pack_leaves_a_batch_not_stopped_or_deleted(redis: Redis, batch: dict[str, str],
                                                          change: dict[str, str]) -> None:
    read = {**batch, **change}
    await put(redis, change)
    assert await pack_call(redis, read) == 0
    assert await stored(redis) == read


async def test_pack_keeps_a_plain_field_written_meanwhile(redis: Redis,
                                                         batch: dict[str, str]) -> None:
    # A later stop with the same outcome writes stop_ts without bumping rev.
    await redis.hset(KEY, "stop_ts", "1796223399.5")
    assert await pack_call(redis, batch) == 1
    assert unpacked(await stored(redis)) == {**batch, "stop_ts": "1796223399.5"}


async def test_pack_twice_packs_once(redis: Redis, batch: dict[str, str]) -> None:
    assert await pack_call(redis, batch) == 1
    held = await stored(redis)
    assert await pack_call(redis, batch) == 0  # `packed` is there: the count matches no more
    assert await stored(redis) == held


async def test_unpack_leaves_a_hash_unpacked_or_packed_again_meanwhile(
        redis: Redis, batch: dict[str, str]) -> None:
    assert await pack_call(redis, batch) == 1
    held = await stored(redis)
    assert await unpack_call(redis, held) == 1
    assert await unpack_call(redis, held) == 0  # unpacked already: nothing written
    assert await stored(redis) == batch
    changed = {**batch, "rev": "50", "reason": "Late"}
    await put(redis, changed)
    assert await pack_call(redis, changed) == 1
    assert await unpack_call(redis, held) == 0  # packed again with other content
    assert unpacked(await stored(redis)) == changed


async def test_unpack_keeps_a_field_written_beside_the_packed_ones(
        redis: Redis, batch: dict[str, str]) -> None:
    assert await pack_call(redis, batch) == 1
    await redis.hset(KEY, "reason", "abandoned")
    held = await stored(redis)
    assert await unpack_call(redis, held) == 1
    assert await stored(redis) == {**batch, "reason": "abandoned"}



async def test_one_call_reads_packs_and_unpacks_many_batches(redis: Redis) -> None:
    batches = {f"dhub:{{pipe}}:batch:b{n}": finished(random.Random(n)) for n in range(3)}
    for key, fields in batches.items():
        await redis.hset(key, mapping=cast(Any, fields))
    names = [*batches, "dhub:{pipe}:batch:gone"]
    replies = await redis.eval(HASHES, len(names), *names)
    assert [orjson.loads(r) if r else None for r in replies] == [*batches.values(), None]
    # The second batch changed since it was read: only the others are packed.
    await redis.hincrby(names[1], "rev", 1)
    args: list[Any] = [x for fields in batches.values()
            for x in (fields["rev"], len(fields), pack(fields)[PACKED])]
    assert await redis.eval(PACK, 3, *batches, *args) == [1, 0, 1]
    held = [cast(dict[str, str], await redis.hgetall(key)) for key in batches]
    assert [PACKED in h for h in held] == [True, False, True]
    args = [x for h in (held[0], held[2])
            for x in (h[PACKED], orjson.dumps({k: v for k, v in unpacked(h).items()
                                               if k not in h}))]
    assert await redis.eval(UNPACK, 2, names[0], names[2], *args) == [1, 1]
    assert [await redis.hgetall(names[n]) for n in (0, 2)] == [batches[names[0]],
                                                              batches[names[2]]]


async def test_pack_leaves_a_hash_with_a_ttl(redis: Redis, batch: dict[str, str]) -> None:
    await redis.expire(KEY, 3600)
    assert await pack_call(redis, batch) == 0
    assert await stored(redis) == batch
    assert await redis.ttl(KEY) > 0


async def test_unpack_keeps_a_ttl(redis: Redis, batch: dict[str, str]) -> None:
    assert await pack_call(redis, batch) == 1
    await redis.expire(KEY, 3600)
    assert await unpack_call(redis, await stored(redis)) == 1
    assert await stored(redis) == batch
    assert await redis.ttl(KEY) > 0


async def test_a_batch_of_more_values_than_lua_unpacks_at_once_packs_and_unpacks(
        redis: Redis) -> None:
    """UNPACK wrote the whole hash with one HSET of unpack(all fields) after a DEL: past the
    limit the HSET failed, after the DEL, and the batch was gone."""
    fields = finished(random.Random(3), LARGE)
    assert 2 * len(fields) > 8000
    await put(redis, fields)
    assert await pack_call(redis, fields) == 1
    assert await unpack_call(redis, await stored(redis)) == 1
    assert await stored(redis) == fields


async def test_an_unpack_that_fails_leaves_the_batch_packed_and_whole(redis: Redis) -> None:
    """A script's writes before an error stay: UNPACK removes `packed` only after the fields
    are written, so a failure (here a value HSET refuses) leaves the batch readable as it was
    (fields written meanwhile hold the packed copies' values), never deleted."""
    fields = finished(random.Random(4), LARGE)
    await put(redis, fields)
    assert await pack_call(redis, fields) == 1
    held = await stored(redis)
    packed_fields = {name: v for name, v in unpacked(held).items() if name not in held}
    bad = orjson.dumps({**packed_fields, "zz": {"not": "a string"}})
    with pytest.raises(ResponseError):
        await redis.eval(UNPACK, 1, KEY, held[PACKED], bad)
    after = await stored(redis)
    assert after[PACKED] == held[PACKED]
    assert unpacked(after) == fields
