"""schemathesis against the API on a real port, on the real Redis and Kafka: every operation
of the generated OpenAPI document, in its examples, coverage (negative data, missing and
duplicate parameters, unlisted methods, odd content types) and fuzzing phases, with all of
its checks: no 5xx, documented statuses, content types and response schemas, valid data
accepted, invalid data refused, 405 with `Allow`, and authentication enforced.

Deterministic (a fixed seed, derandomized) and bounded: a few examples per operation.
The server runs in a thread with its own event loop, because schemathesis' tests are
synchronous and call it over HTTP.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from aiohttp import web
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from pydantic import SecretStr

from core.connections import open_redis
from core.settings import Settings, get_settings
from service import openapi, openapi_parts
from service.app import init_app
from service.appkeys import REGISTRY, STORE
from service.edge import ApiRunner
from tests.conftest import _parts_up
from tests.helpers import AUTH, api_settings, spec

# Small and fixed for `make test`; raise them for a deeper hunt, e.g.
# DHUB_FUZZ_EXAMPLES=100 DHUB_FUZZ_SEED=7 pytest tests/test_api_fuzz.py
MAX_EXAMPLES = int(os.environ.get("DHUB_FUZZ_EXAMPLES", "6"))
SEED = int(os.environ.get("DHUB_FUZZ_SEED", "20261128"))
_REFUSABLE = ["2xx", "400", "401", "403", "404", "409"]

CONFIG = schemathesis.Config.from_dict({
    "seed": SEED,
    # The test sends real credentials with every request (below), so schemathesis does not
    # generate its own; the auth check still sends each operation without and with invalid
    # credentials. Unknown query parameters are not generated: most GETs ignore them (a
    # client's cache-buster must not break a call); the list refuses them, but for a `_`
    # cache-buster (tests/test_lists_truth.py).
    "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True,
                   "database": "none", "no-shrink": True, "with-security-parameters": False,
                   "allow-extra-parameters": False},
    "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True},
               "fuzzing": {"enabled": True}, "stateful": {"enabled": True}},
    "checks": {"enabled": True},
    # What JSON Schema cannot say, so valid-looking data the API rightly refuses with 400:
    # step names unique within a pipeline (no "unique by property" keyword), a paging
    # token is an opaque signed value no generator can forge, and a run's config names the
    # steps of the pipeline version run, each key checked by its step's own config model.
    "operations": [
        {"include-path": "/api/v1/batches/{pipeline_id}", "include-method": "POST",
         "checks": {"positive_data_acceptance": {"expected-statuses": _REFUSABLE}}},
        {"include-path": "/api/v1/batches/{pipeline_id}/{batch_id}/resume",
         "include-method": "POST",
         "checks": {"positive_data_acceptance": {"expected-statuses": _REFUSABLE}}},
        {"include-path": "/api/v1/pipelines/{pipeline_id}", "include-method": "PUT",
         "checks": {"positive_data_acceptance": {"expected-statuses": _REFUSABLE}}},
        {"include-path": "/api/v1/batches/{pipeline_id}/", "include-method": "GET",
         "checks": {"positive_data_acceptance": {"expected-statuses": _REFUSABLE}}},
    ],
})
SCHEMA = schemathesis.openapi.from_dict(openapi.build(), config=CONFIG)


def _settings(stack: Settings) -> Settings:
    suffix = uuid.uuid4().hex[:10]
    db = int(os.environ.get("DHUB_TEST_REDIS_DB", "15"))
    return api_settings(stack.model_copy(update={
        "redis_url": f"{stack.redis_url.rsplit('/', 1)[0]}/{db}",
        "topic_commands": f"test.{suffix}.commands",
        "topic_events": f"test.{suffix}.events",
        "topic_dlq": f"test.{suffix}.dlq",
        # Its own durable-record topics too: the fuzzed PUTs must not land on the shared
        # batches.pipelines (a `make rebuild` of the stack would register them).
        "topic_pipelines": f"test.{suffix}.pipelines",
        "topic_snapshots": f"test.{suffix}.snapshots",
        "snapshots_partitions": 1,
        "commands_partitions": 1,
        "events_partitions": 1,
        "api_tokens": [],
        "api_token": None,
    }), webhook_secret=SecretStr("fuzz-webhook-secret"))


class _Server:
    """The API with its topics and a registered pipeline, served by `service.edge` in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, name="fuzz-api", daemon=True)

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported by the fixture
            self.error = exc
            self.ready.set()
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        s = self.settings
        topics = [s.topic_commands, s.topic_events, s.topic_dlq]
        compacted = [s.topic_pipelines, s.topic_snapshots]
        admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
        await admin.start()
        redis = await open_redis(s)
        try:
            await admin.create_topics(
                [NewTopic(t, 1, 1) for t in topics]
                + [NewTopic(t, 1, 1, topic_configs={"cleanup.policy": "compact"})
                   for t in compacted])
            await redis.flushdb()
            runner = ApiRunner(init_app(s), access_log=None)
            await runner.setup()
            try:
                await web.TCPSite(runner, "127.0.0.1", 0).start()
                self.port = int(runner.addresses[0][1])
                # What the document's examples name exists, so success paths are exercised.
                pipeline_id = openapi_parts.EXAMPLE_PIPELINE
                await runner.app[REGISTRY].register(pipeline_id, spec())
                await runner.app[STORE].create(pipeline_id, openapi_parts.EXAMPLE_BATCH, spec())
                self._stop = asyncio.Event()
                self.ready.set()
                await self._stop.wait()
            finally:
                await runner.cleanup()
        finally:
            await redis.flushdb()
            await redis.aclose()
            try:
                await admin.delete_topics([*topics, *compacted])
            finally:
                await admin.close()

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def fuzz_base_url() -> Iterator[str]:
    # Only Redis and Kafka: the API never calls Prefect, so its outages do not stop this test.
    stack = get_settings()
    with _parts_up(("redis", "kafka"), stack):
        yield from _serve(stack)


def _serve(stack: Settings) -> Iterator[str]:
    server = _Server(_settings(stack))
    server.thread.start()
    assert server.ready.wait(timeout=60), "the API did not start"
    if server.error is not None:
        raise server.error
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


@SCHEMA.parametrize()
def test_api_conforms_to_its_openapi_document(case: Any, fuzz_base_url: str) -> None:
    # Credentials passed here count as explicit: the auth check then also sends the request
    # without them and with invalid ones, and expects 401.
    case.call_and_validate(base_url=fuzz_base_url, headers=AUTH)
