"""Shared test helpers: an in-process API client on the real engines, tokens, sample pipelines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import jwt
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaConsumer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from consumers.retention import RetentionSweeper
from core.models import PipelineSpec
from core.settings import Settings
from service.app import init_app

STATIC_TOKEN = "test-static-token-0123456789"
HS_SECRET = "test-hs256-secret-with-enough-length-for-sha256"
_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PRIVATE = _RSA_KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
RSA_PUBLIC = _RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
).decode()
AUTH = {"Authorization": f"Bearer {STATIC_TOKEN}"}


def api_settings(settings: Settings, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api_tokens": [SecretStr(STATIC_TOKEN)],
        "jwt_hs256_secret": SecretStr(HS_SECRET),
        "jwt_rs256_public_key": RSA_PUBLIC,
    }
    values.update(overrides)
    return settings.model_copy(update=values)


def hs_token(*scopes: str, ttl: float = 300, **claims: Any) -> str:
    payload = {"sub": "tester", "scope": " ".join(scopes), "exp": int(time.time() + ttl), **claims}
    return jwt.encode(payload, HS_SECRET, algorithm="HS256")


def rs_token(*scopes: str, ttl: float = 300) -> str:
    payload = {"sub": "tester", "scopes": list(scopes), "exp": int(time.time() + ttl)}
    return jwt.encode(payload, RSA_PRIVATE, algorithm="RS256")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def spec_body(name: str = "sales-pipeline", version: str = "1",
              steps: tuple[str, ...] = ("extract", "transform", "load")) -> dict[str, Any]:
    return {"name": name, "version": version,
            "steps": [{"name": s, "uses": f"sales.{s}", "config": {}} for s in steps]}


def spec(**kwargs: Any) -> PipelineSpec:
    return PipelineSpec.model_validate(spec_body(**kwargs))


@asynccontextmanager
async def api_client(settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    client: TestClient[Any, Any] = TestClient(TestServer(init_app(settings)))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


async def read_topic(settings: Settings, topic: str, until: Callable[[list[Any]], bool],
                     timeout: float = 20.0) -> list[Any]:
    """Every record of `topic` from the start, once `until(records)` holds."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    records: list[Any] = []
    try:
        async with asyncio.timeout(timeout):
            while not until(records):
                for part in (await consumer.getmany(timeout_ms=200)).values():
                    records.extend(part)
    finally:
        await consumer.stop()
    return records


async def create_call(redis: Any, pipeline_id: str, batch_id: str,
                      spec: PipelineSpec) -> tuple[list[str], list[Any]]:
    """The KEYS and ARGV `BatchStore.create` gives CREATE_BATCH, captured, not run: what the
    API's create template replays through CREATE_LATEST_BATCH."""
    from core.scripts import Scripts
    from core.store import BatchStore

    calls: list[tuple[list[str], list[Any]]] = []

    async def capture(keys: list[str], args: list[Any], client: Any = None) -> int:
        calls.append((keys, args))
        return 1

    capturing = Scripts(redis)
    capturing.create_batch = capture  # type: ignore[assignment]
    await BatchStore(redis, capturing, token_secret=b"t").create(pipeline_id, batch_id, spec)
    [call] = calls
    return call


async def swept_at(settings: Settings, clock: Callable[[], float]) -> int:
    """One retention round as of `clock` (the sweeper's `time.time`): how many it removed."""
    sweeper = RetentionSweeper(settings, clock=clock)
    await sweeper.start()
    try:
        return await sweeper.sweep_once()
    finally:
        await sweeper.stop()
