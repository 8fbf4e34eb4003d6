"""The local stack as `make up` leaves it: every engine ready, Redis persistent, the topics and
the work pool in place."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import httpx
from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import Redis

from core.connections import open_redis
from core.settings import ROOT, Settings


def load_stack() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dhub_stack", ROOT / "deploy" / "local" / "stack.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("dhub_stack", module)
    spec.loader.exec_module(module)
    return module


def test_every_engine_answers_its_readiness_check(stack: Settings) -> None:
    module = load_stack()
    for part in ("redis", "kafka", "prefect", "worker"):
        assert module.is_ready(part), part


async def test_redis_persists_with_aof(stack: Settings) -> None:
    redis: Redis = await open_redis(stack)
    try:
        assert (await redis.config_get("appendonly"))["appendonly"] == "yes"
    finally:
        await redis.aclose()


async def test_topics_exist_with_their_partitions(stack: Settings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([stack.topic_commands, stack.topic_events, stack.topic_dlq])
    finally:
        await admin.close()
    partitions = {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}
    assert partitions == {stack.topic_commands: stack.commands_partitions,
                          stack.topic_events: stack.events_partitions,
                          stack.topic_dlq: stack.dlq_partitions}


def test_prefect_has_the_work_pool(stack: Settings) -> None:
    response = httpx.get(f"{stack.prefect_api_url}/work_pools/{stack.work_pool}", timeout=5)
    assert response.status_code == 200 and response.json()["type"] == "process"
