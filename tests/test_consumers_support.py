"""Helpers for the consumers' tests (no tests here): parts run in-process against the real
Kafka, Redis and Prefect of the stack, and Prefect deployments made for one test."""

from __future__ import annotations

import contextlib
import textwrap
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from redis.asyncio import Redis

from consumers.plumbing.options import ConsumerOptions
from consumers.plumbing.part import Part
from consumers.plumbing.scope import serving
from core import keys
from core.codec import Command
from core.connections import open_producer
from core.models import TAG_BATCH_PREFIX, PipelineSpec, new_batch_id
from core.packing import unpacked
from core.registry import PipelineRegistry
from core.scripts import Scripts
from core.settings import Settings
from core.store import BatchStore
from pipelines.sales import PIPELINE_NAME

# Runs of deployments on this pool stay Scheduled: no worker polls it.
IDLE_POOL = "dhub-test-idle"

FAST = ConsumerOptions(retry_initial_s=0.1, retry_max_s=0.5, poll_timeout_ms=100,
                       delete_cancel_wait_s=8.0, prefect_timeout_s=10.0,
                       reconcile_interval_s=0.5, bridge_checkpoint_every_s=0.2)

# A run-pipeline flow for runs that really execute on the stack's worker: each step is a
# task named after it; `fail` names a step that raises, `sleep` slows every step.
FLOW_SOURCE = textwrap.dedent('''
    import time
    from prefect import flow, task

    @task
    def step(name: str, fail: str, sleep: float) -> None:
        time.sleep(sleep)
        if name == fail:
            raise ValueError(f"{name} failed on purpose")

    @flow(name="run-pipeline")
    def run_pipeline(batch_id: str, pipeline_id: str, pipeline_version: str,
                     steps: list[str] = [], fail: str = "", sleep: float = 0.0) -> None:
        for name in steps:
            step.with_options(task_run_name=name)(name, fail, sleep)
''')


def make_spec(name: str, version: str = "1",
              steps: tuple[str, ...] = ("extract", "transform", "load")) -> PipelineSpec:
    return PipelineSpec.model_validate({
        "name": name, "version": version,
        "steps": [{"name": s, "uses": f"test.{s}"} for s in steps],
    })


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def store_for(redis: Redis, settings: Settings) -> BatchStore:
    return BatchStore.from_settings(redis, settings)


async def new_batch(redis: Redis, settings: Settings, pipeline_id: str,
                    spec: PipelineSpec) -> str:
    """What the API does on POST: register the version (idempotent) and create the batch."""
    await PipelineRegistry(redis, Scripts(redis)).register(pipeline_id, spec)
    batch_id = new_batch_id()
    await store_for(redis, settings).create(pipeline_id, batch_id, spec)
    return batch_id


async def send(settings: Settings, topic: str, key: str | None, value: bytes | None) -> None:
    producer = await open_producer(settings)
    try:
        await producer.send_and_wait(topic, value=value, key=key.encode() if key else None)
    finally:
        await producer.stop()


# The producer's default max_request_size: the largest record it sends, headers included.
MAX_RECORD = 1_048_576


def near_the_size_limit(key: str, head: bytes, tail: bytes) -> bytes:
    """`head`, x's, `tail`: a value the producer still sends with `key` (a few bytes under
    MAX_RECORD), so that the same value with any dead letter's headers is too large."""
    room: int = MAX_RECORD - 8 - DefaultRecordBatchBuilder.estimate_size_in_bytes(
        key.encode(), b"", [])
    value = head + b"x" * (room - len(head) - len(tail) - 4) + tail  # 4: the length's varint
    size: int = DefaultRecordBatchBuilder.estimate_size_in_bytes(key.encode(), value, [])
    assert size <= MAX_RECORD
    return value


async def send_command(settings: Settings, kind: str, pipeline_id: str, batch_id: str,
                       version: str = "1") -> Command:
    command = Command(type=kind, batch_id=batch_id, pipeline_id=pipeline_id,
                      pipeline_version=version)
    await send(settings, settings.topic_commands, command.key.decode(), command.encode())
    return command


@contextlib.asynccontextmanager
async def running(part: Part) -> AsyncIterator[Part]:
    """The part started on clients of its own and running as a task; stopped and closed the
    way the runner stops it (`consumers.plumbing.scope.serving`)."""
    async with serving([part], part.settings, part.options.shutdown_timeout_s):
        yield part


@contextlib.asynccontextmanager
async def prefect(settings: Settings) -> AsyncIterator[PrefectClient]:
    async with PrefectClient(settings.prefect_api_url) as client:
        yield client


class Deployer:
    """An `ensure_deployment` of our own making deployments `run-pipeline/<spec.name>`:
    on the idle pool (runs wait forever) or, with `flow_dir`, on the stack's pool running
    FLOW_SOURCE. Everything it made is deleted by `cleanup()`."""

    def __init__(self, settings: Settings, flow_dir: Path | None = None,
                 parameters: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.flow_dir = flow_dir
        self.parameters = parameters or {}
        self.ids: list[UUID] = []
        self.calls = 0

    async def ensure(self, spec: PipelineSpec, settings: Settings) -> UUID:
        # The stack's own deployment (`run-pipeline/sales-pipeline`), repointed at the idle
        # pool and deleted afterwards, would strand the runs of the tests running meanwhile
        # on the stack (`make test` runs two files at once): a test's pipelines name their own.
        assert spec.name != PIPELINE_NAME, "a Deployer's spec needs a name of the test's own"
        self.calls += 1
        async with prefect(settings) as client:
            flow_id = await client.create_flow_from_name("run-pipeline")
            if self.flow_dir is None:
                with contextlib.suppress(ObjectAlreadyExists):
                    await client.create_work_pool(WorkPoolCreate(name=IDLE_POOL, type="process"))
                deployment_id = await client.create_deployment(
                    flow_id=flow_id, name=spec.name, work_pool_name=IDLE_POOL)
            else:
                (self.flow_dir / "dhub_test_flow.py").write_text(FLOW_SOURCE)
                deployment_id = await client.create_deployment(
                    flow_id=flow_id, name=spec.name, work_pool_name=settings.work_pool,
                    path=str(self.flow_dir), entrypoint="dhub_test_flow.py:run_pipeline",
                    parameters={"steps": spec.step_names, **self.parameters})
        self.ids.append(deployment_id)
        return deployment_id

    async def cleanup(self, batch_ids: list[str]) -> None:
        async with prefect(self.settings) as client:
            for batch_id in batch_ids:
                for run in await flow_runs(client, batch_id):
                    with contextlib.suppress(ObjectNotFound):
                        await client.delete_flow_run(run.id)
            for deployment_id in set(self.ids):
                with contextlib.suppress(ObjectNotFound):
                    await client.delete_deployment(deployment_id)


async def flow_runs(client: PrefectClient, batch_id: str) -> list[Any]:
    return await client.read_flow_runs(flow_run_filter=FlowRunFilter(
        tags=FlowRunFilterTags(all_=[TAG_BATCH_PREFIX + batch_id])))


async def group_offsets(settings: Settings, group: str) -> dict[TopicPartition, int]:
    """The group's committed offset of each partition it committed on."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp: int(meta.offset) for tp, meta in offsets.items()}


async def committed(settings: Settings, group: str, topic: str) -> int:
    """How many records of `topic` the group has committed, over all partitions."""
    offsets = await group_offsets(settings, group)
    return sum(offset for tp, offset in offsets.items() if tp.topic == topic and offset > 0)


async def events_committed_is(settings: Settings, n: int) -> bool:
    """The events group has committed exactly `n` records of the events topic."""
    return await committed(settings, settings.group_events, settings.topic_events) == n


def options(**overrides: Any) -> ConsumerOptions:
    return FAST.model_copy(update=overrides)


@dataclass
class PipelineCtx:
    """One test's pipeline on the real stack: its batches, created the way the API does."""

    settings: Settings
    redis: Redis
    deployer: Deployer
    pipeline_id: str
    batches: list[str] = field(default_factory=list)

    async def batch(self, **spec_args: Any) -> str:
        spec = make_spec(self.pipeline_id, **spec_args)
        batch_id = await new_batch(self.redis, self.settings, self.pipeline_id, spec)
        self.batches.append(batch_id)
        return batch_id

    async def fields(self, batch_id: str) -> dict[str, str]:
        # The test clients decode responses: every field and value is a str.
        return unpacked(cast(dict[str, str],
                             await self.redis.hgetall(keys.batch(self.pipeline_id, batch_id))))
