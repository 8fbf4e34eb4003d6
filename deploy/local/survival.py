"""`survival.py mark FILE` before a `down`, `survival.py check FILE` after the next `up`: did
the stack's data survive? A Redis key (AOF), the three topics (Kafka's log dirs) and
Prefect's rows (its database: the work pool keeps its id)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx
import redis
from aiokafka.admin import AIOKafkaAdminClient

from core.settings import Settings, get_settings

KEY = "dhub:bench:survives"


async def _topics(s: Settings) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


def _pool_id(s: Settings) -> str:
    return str(httpx.get(f"{s.prefect_api_url}/work_pools/{s.work_pool}", timeout=5).json()["id"])


def main() -> None:
    action, marker = sys.argv[1], Path(sys.argv[2])
    s = get_settings()
    client = redis.Redis.from_url(s.redis_url)
    if action == "mark":
        client.set(KEY, "1")
        marker.write_text(_pool_id(s))
        return
    lost = []
    if client.get(KEY) != b"1":
        lost.append("redis key")
    if not {s.topic_commands, s.topic_events, s.topic_dlq} <= asyncio.run(_topics(s)):
        lost.append("kafka topics")
    if _pool_id(s) != marker.read_text():
        lost.append("prefect rows")
    print("LOST: " + ", ".join(lost) if lost else "yes (redis key, kafka topics, prefect rows)")


if __name__ == "__main__":
    main()
