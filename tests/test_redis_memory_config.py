"""The stack's Redis keeps batch hashes compact (issue 12: a finished batch's bytes): a
batch's `config` or `reason` longer than Redis's default 64-byte listpack value would turn
its whole hash into a hashtable (`make bench-storage`: 8.2 KB -> 3.7 KB per finished batch)."""

from __future__ import annotations

from pathlib import Path

from redis.asyncio import Redis

from benchmarks.storage import CONFIG
from core.settings import get_settings
from deploy.local.config import StackConfig
from deploy.local.parts.redis import MEMORY_CONFIG, command
from tests.conftest import PrivateRedis

P = "mem"


def test_the_stack_writes_the_memory_settings_into_its_config(tmp_path: Path) -> None:
    own = get_settings().model_copy(update={"state_dir": tmp_path})  # not the stack's file
    conf = Path(command(StackConfig(own))[-1])
    assert conf.is_relative_to(tmp_path)
    lines = conf.read_text().splitlines()
    for name, value in MEMORY_CONFIG.items():
        assert f"{name} {value}" in lines


async def test_a_batch_hash_with_a_demo_config_stays_a_listpack(
        private_redis: PrivateRedis) -> None:
    redis = Redis(port=private_redis.port, decode_responses=True)
    try:
        fields = {"id": "batch-x", "config": CONFIG, "reason": "r" * 200,
                  **{f"off:s:partition_{n}": str(n) for n in range(72)}}
        await redis.hset(f"dhub:{{{P}}}:batch:x", items=[x for pair in fields.items() for x in pair])
        assert await redis.object("encoding", f"dhub:{{{P}}}:batch:x") == "hashtable"
        for name, value in MEMORY_CONFIG.items():
            await redis.config_set(name, value)
        await redis.hset(f"dhub:{{{P}}}:batch:y", items=[x for pair in fields.items() for x in pair])
        assert await redis.object("encoding", f"dhub:{{{P}}}:batch:y") == "listpack"
    finally:
        await redis.aclose()
