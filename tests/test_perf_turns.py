"""Reads of one loop turn share one pipelined round trip (service/turns.py), which POST uses to
learn the latest version of a pipeline."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from core import keys
from core.settings import Settings
from service.turns import TurnReads
from tests.cache_support import engines


def _commands_in(packed: bytes) -> int:
    """How many commands a RESP packet holds (arrays of bulk strings)."""
    count, at = 0, 0
    while at < len(packed):
        end = packed.index(b"\r\n", at)
        args = int(packed[at + 1:end])
        at = end + 2
        for _ in range(args):
            end = packed.index(b"\r\n", at)
            at = end + 2 + int(packed[at + 1:end]) + 2
        count += 1
    return count


class CountingPipelines:
    """Counts the packets a client's connections send and the commands in each: one packet
    is one round trip."""

    def __init__(self, redis: Redis) -> None:
        self.sizes: list[int] = []
        pool = redis.connection_pool
        checkout = pool.get_connection

        def count(conn: Any) -> Any:
            if not getattr(conn, "_counted", False):
                send = conn.send_packed_command

                async def counted(command: Any, *a: Any, **k: Any) -> Any:
                    packed = command if isinstance(command, bytes) else b"".join(command)
                    self.sizes.append(_commands_in(packed))
                    return await send(command, *a, **k)

                conn.send_packed_command = counted
                conn._counted = True
            return conn

        async def get_connection(*args: Any, **kwargs: Any) -> Any:
            return count(await checkout(*args, **kwargs))  # type: ignore[no-untyped-call]

        pool.get_connection = get_connection  # type: ignore[method-assign]
        # Connections already out (the one service.turns keeps between exchanges) or idle.
        for conn in [*pool._in_use_connections, *pool._available_connections]:
            count(conn)


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    yield from engines("redis")


async def test_reads_of_one_turn_share_a_round_trip_and_equal_reads_share_a_reply(
        redis: Redis) -> None:
    for n in range(5):
        await redis.rpush(keys.pipeline_order(f"p{n}"), "1", str(n + 2))
    counter = CountingPipelines(redis)
    reads = TurnReads(redis)
    asked = [("LINDEX", keys.pipeline_order(f"p{n % 5}"), "-1") for n in range(40)]
    replies = await asyncio.gather(*(reads.read(*command) for command in asked))
    assert counter.sizes == [5]
    assert replies == [str(n % 5 + 2) for n in range(40)]
    # A later turn reads again: a version registered meanwhile is seen.
    await redis.rpush(keys.pipeline_order("p0"), "9")
    assert await reads.read("LINDEX", keys.pipeline_order("p0"), "-1") == "9"
    assert await reads.read("LINDEX", keys.pipeline_order("none"), "-1") is None


async def test_an_error_reaches_only_its_own_reader(redis: Redis) -> None:
    await redis.set("perf:string", "x")
    await redis.rpush(keys.pipeline_order("p"), "1")
    reads = TurnReads(redis)
    outcomes: tuple[Any, Any] = await asyncio.gather(
        reads.read("LINDEX", "perf:string", "-1"),
        reads.read("LINDEX", keys.pipeline_order("p"), "-1"), return_exceptions=True)
    wrong, right = outcomes
    assert isinstance(wrong, Exception) and "WRONGTYPE" in str(wrong)
    assert right == "1"


async def test_redis_unreachable_fails_every_reader_of_the_turn() -> None:
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5,
                          decode_responses=True)
    try:
        reads = TurnReads(dead)
        outcomes = await asyncio.gather(reads.read("LINDEX", "a", "-1"),
                                        reads.read("LINDEX", "b", "-1"), return_exceptions=True)
        assert all(isinstance(o, Exception) for o in outcomes), outcomes
    finally:
        await dead.aclose()


async def test_script_calls_of_one_turn_share_a_round_trip_and_an_unknown_script_is_loaded(
        redis: Redis) -> None:
    # A script body no test ran before: Redis does not know it, so EVALSHA answers NOSCRIPT
    # and the call is made again on its own (which loads it).
    marker = uuid.uuid4().hex
    script = redis.register_script(
        f"-- {marker}\nredis.call('SET', KEYS[1], ARGV[1]) return ARGV[1]")
    reads = TurnReads(redis)
    counter = CountingPipelines(redis)
    replies = await asyncio.gather(*(reads.script(script, [f"perf:{n}"], [str(n)])
                                     for n in range(20)))
    assert replies == [str(n) for n in range(20)]
    assert counter.sizes[0] == 20  # one pipeline for the turn (then the reloads, one each)
    assert [await redis.get(f"perf:{n}") for n in range(20)] == [str(n) for n in range(20)]
    counter.sizes.clear()
    again = await asyncio.gather(*(reads.script(script, [f"perf:{n}"], ["x"]) for n in range(5)))
    assert again == ["x"] * 5 and counter.sizes == [5]  # known now: no reload


def test_commands_are_packed_as_redis_py_packs_them() -> None:
    from redis.asyncio.connection import Connection
    from redis.exceptions import DataError

    from service.turns import _pack

    conn = Connection()
    for command in [("LINDEX", "p:{x}:order", "-1"), ("EVALSHA", "ab" * 20, 4, "k", "é✓", b"\x00[1]"),
                    ("SET", "k", 12.5), ("INCRBY", "k", -7), ("SET", "k", "")]:
        assert _pack(command) == b"".join(conn.pack_command(*command)), command
    with pytest.raises(DataError):
        _pack(("SET", "k", True))


async def test_the_connection_kept_between_turns_is_replaced_once_redis_dropped_it(
        redis: Redis) -> None:
    await redis.rpush(keys.pipeline_order("p"), "1")
    reads = TurnReads(redis)
    kept = await reads.read("CLIENT", "ID")  # asked on the connection the turns keep
    assert await reads.read("CLIENT", "ID") == kept
    await redis.client_kill_filter(_id=str(kept))
    # The next turn meets the closed socket and is sent again on a new connection.
    assert await reads.read("LINDEX", keys.pipeline_order("p"), "-1") == "1"
    assert await reads.read("CLIENT", "ID") != kept
