"""HSET_ALL_LUA (core.lua_hset), the scripts' HSET of a hash of any size, on a real Redis."""

from __future__ import annotations

from redis.asyncio import Redis

from core.lua_hset import HSET_ALL_LUA

SCRIPT = HSET_ALL_LUA + "hset_all(KEYS[1], ARGV)\nreturn redis.call('HLEN', KEYS[1])\n"


async def test_a_hash_past_luas_unpack_limit_is_written_whole(redis: Redis) -> None:
    # 8,002 values: one HSET of unpack(ARGV) fails from 8,000 ("too many results to unpack").
    fields = {f"field_{n}": str(n) for n in range(4_001)}
    flat = [x for item in fields.items() for x in item]
    assert await redis.eval(SCRIPT, 1, "hash", *flat) == len(fields)
    assert await redis.hgetall("hash") == fields


async def test_nothing_to_write_writes_nothing(redis: Redis) -> None:
    assert await redis.eval(SCRIPT, 1, "hash") == 0
    assert not await redis.exists("hash")
