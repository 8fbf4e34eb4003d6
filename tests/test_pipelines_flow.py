"""The run-pipeline flow through the real Prefect worker of the stack.

The worker's flow runs use the stack's own settings (Redis database 0, topic
`batches.events`), not a test's private ones: so these tests register uniquely named
pipelines there, read `batches.events` from its end, keep only their batch's events, and
remove their pipeline, deployment and flow runs afterwards.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import PrefectHTTPStatusError
from prefect.states import Cancelling
from redis.asyncio import Redis

from core import keys
from core.codec import Event
from core.connections import open_redis
from core.models import FLOW_NAME, PipelineSpec, flow_run_tags, new_batch_id
from core.prefect_events import EVENT_ID_PREFIX
from core.registry import PipelineRegistry, Registered
from core.scripts import Scripts
from core.settings import ROOT, Settings, get_settings
from core.store import BatchStore
from pipelines.prefect_deployment import ENTRYPOINT, ensure_deployment, prefect_client
from pipelines.sales import demo_spec
from pipelines.sales.records import partition_sizes
from tests.conftest import eventually
from tests.test_pipelines_sales import expected_from_source
from tests.test_pipelines_sdk import EventTail, merged_offsets

STEPS = ["extract", "transform", "load"]


class Harness:
    """One uniquely named pipeline on the stack, and the runs made of it."""

    def __init__(self, settings: Settings, redis: Redis, client: PrefectClient,
                 tail: EventTail) -> None:
        self.settings = settings
        self.redis = redis
        self.client = client
        self.tail = tail
        suffix = uuid.uuid4().hex[:10]
        self.pipeline_id = f"test-pipeline-{suffix}"
        self.name = f"test-sales-{suffix}"
        self.deployment_id: UUID | None = None
        self.spec: PipelineSpec | None = None
        self.batches: list[str] = []
        # The projection the events consumer maintains, applied here from the tail's events
        # with the same function (the consumers are not part of this test's stack).
        self.store = BatchStore(redis, Scripts(redis), token_secret=b"test")

    async def register(self, spec: PipelineSpec) -> UUID:
        registry = PipelineRegistry(self.redis, Scripts(self.redis))
        assert await registry.register(self.pipeline_id, spec) is Registered.CREATED
        self.spec = spec
        self.deployment_id = await ensure_deployment(spec, self.settings)
        return self.deployment_id

    async def run(self, version: str = "1") -> tuple[str, FlowRun]:
        assert self.deployment_id is not None and self.spec is not None
        batch_id = new_batch_id()
        await self.store.create(self.pipeline_id, batch_id, self.spec)
        self.batches.append(batch_id)
        flow_run = await self.client.create_flow_run_from_deployment(
            self.deployment_id,
            parameters={"batch_id": batch_id, "pipeline_id": self.pipeline_id,
                        "pipeline_version": version},
            tags=flow_run_tags(batch_id, self.pipeline_id, version),
            idempotency_key=batch_id,
        )
        return batch_id, flow_run

    async def finished(self, flow_run_id: UUID, timeout: float = 60.0) -> FlowRun:
        async def final() -> FlowRun | None:
            run = await self.client.read_flow_run(flow_run_id)
            return run if run.state is not None and run.state.is_final() else None

        run = await eventually(final, timeout=timeout, interval=0.1)
        assert isinstance(run, FlowRun)
        return run

    async def task_runs(self, flow_run_id: UUID, expected: dict[str, str]) -> None:
        """Waits for the task runs' states: they reach the API asynchronously (as events)."""

        async def check() -> bool:
            runs = await self.client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return {tr.name: tr.state.type.value if tr.state else "" for tr in runs} == expected

        await eventually(check, timeout=15, interval=0.1)

    async def run_inside_extract(self) -> tuple[str, Any]:
        """A throttled run (~20 s per step), returned once `extract` has reported progress."""
        await self.register(demo_spec(name=self.name, rows=4_000, partitions=2, throttle=200))
        batch_id, flow_run = await self.run()
        await self.tail.until(batch_id, lambda evs: sum(
            step_offsets(evs, "extract").values()) > 0, timeout=60)
        return batch_id, flow_run

    async def events(self, batch_id: str) -> list[Event]:
        """Every event the flow published for the batch (the tail keeps what it read before),
        up to its stop. Events the Prefect bridge forwards (when the stack's consumers run)
        carry ids derived from Prefect's and are not the flow's: they are left out."""
        events = await self.tail.until(batch_id, lambda evs: any(
            e.type == "batch.state" and e.state == "stop" and not _bridged(e) for e in evs),
            timeout=30)
        return [e for e in events if not _bridged(e)]

    async def project(self, batch_id: str) -> dict[str, Any]:
        """Applies the events read so far to the batch's hash; the batch as GET shows it."""
        await self.store.apply(e for e in self.tail.events if e.batch_id == batch_id)
        batch = await self.store.get(self.pipeline_id, batch_id)
        assert batch is not None
        return batch

    async def cleanup(self) -> None:
        """Removes the pipeline, its batches and its deployment, but not the flow runs:
        deleting a flow run whose task-run events the Prefect server has not recorded yet
        makes its task-run recorder fail on a foreign key and retry, delaying every other
        run's task-run states for minutes (seen with the SQLite server)."""
        for batch_id in self.batches:
            await self.store.purge(self.pipeline_id, batch_id)
        await self.redis.delete(keys.batch_index(self.pipeline_id),
                                keys.batch_seq(self.pipeline_id))
        if self.deployment_id is not None:
            await self.client.delete_deployment(self.deployment_id)
        await self.redis.delete(keys.pipeline_versions(self.pipeline_id),
                                keys.pipeline_order(self.pipeline_id))
        await self.redis.srem(keys.PIPELINES, self.pipeline_id)


@pytest.fixture
async def harness(stack: Settings) -> AsyncIterator[Harness]:
    redis = await open_redis(stack)
    tail = EventTail(stack, stack.topic_events, from_end=True)
    try:
        await tail.start()
        async with prefect_client(stack) as client:
            h = Harness(stack, redis, client, tail)
            try:
                yield h
            finally:
                await h.cleanup()
    finally:
        await tail.stop()
        await redis.aclose()


def states(events: list[Event], step: str) -> list[str | None]:
    return [e.state for e in events if e.type == "step.state" and e.step == step]


def _bridged(event: Event) -> bool:
    return event.event_id.startswith(EVENT_ID_PREFIX)


def step_offsets(events: list[Event], step: str) -> dict[str, int]:
    return merged_offsets([e for e in events if e.step == step])


async def test_a_run_completes_through_the_worker_and_reports_every_step(harness: Harness) -> None:
    rows, partitions = 3_001, 3
    spec = demo_spec(name=harness.name, rows=rows, partitions=partitions, throttle=None)
    deployment_id = await harness.register(spec)
    batch_id, flow_run = await harness.run()
    created = time.monotonic()

    async def running() -> bool:
        run = await harness.client.read_flow_run(flow_run.id)
        return run.state is not None and (run.state.is_running() or run.state.is_final())

    await eventually(running, timeout=60, interval=0.05)
    print(f"\ncreate_flow_run -> Running through the worker: {time.monotonic() - created:.2f}s")
    final = await harness.finished(flow_run.id)
    assert final.state is not None and final.state.is_completed(), final.state
    assert final.deployment_id == deployment_id

    await harness.task_runs(flow_run.id, dict.fromkeys(STEPS, "COMPLETED"))

    events = await harness.events(batch_id)
    first, last = events[0], events[-1]
    assert (first.type, first.state, first.flow_run_id) == ("batch.state", "running",
                                                           str(flow_run.id))
    assert [(e.step, e.state) for e in events[1:4]] == [(s, "pending") for s in STEPS]
    assert (last.type, last.state, last.outcome) == ("batch.state", "stop", "completed")
    sizes = {f"partition_{i}": n for i, n in enumerate(partition_sizes(rows, partitions))}
    for step in STEPS:
        assert states(events, step) == ["pending", "running", "success"], step
        assert step_offsets(events, step) == sizes, step
    # each step's events come after the previous step's success
    order = [(e.step, e.state) for e in events if e.type == "step.state" and e.state != "pending"]
    assert order == [(s, st) for s in STEPS for st in ("running", "success")]

    batch = await harness.project(batch_id)
    steps = batch["state"]["steps"]
    assert batch["state"]["state"] == "stop"
    assert {step: (entry["state"], entry["offsets"]) for step, entry in steps.items()} == {
        step: ("success", sizes) for step in STEPS}
    # The steps reported their totals: done means 100%, nothing left.
    for entry in steps.values():
        assert entry["totals"] == sizes
        assert (entry["progress"]["percent"], entry["progress"]["eta_s"]) == (100.0, 0.0)
    assert (batch["outcome"], batch["flow_run_id"]) == ("completed", str(flow_run.id))

    root = get_settings().data_root / batch_id  # where the worker's flow runs write
    with closing(sqlite3.connect(root / "sales.db")) as db:
        loaded = {(r[0], r[1]): (r[2], r[3], r[4]) for r in db.execute(
            "SELECT region, day, revenue_cents, orders, units FROM daily_revenue "
            "WHERE batch_id = ?", (batch_id,))}
    assert loaded == expected_from_source(root)
    assert sum(v[1] for v in loaded.values()) == rows


async def test_fail_at_transform_fails_the_flow_and_load_never_runs(harness: Harness) -> None:
    spec = demo_spec(name=harness.name, rows=1_000, partitions=2, throttle=None,
                     fail_at="transform")
    await harness.register(spec)
    batch_id, flow_run = await harness.run()
    final = await harness.finished(flow_run.id)
    assert final.state is not None and final.state.is_failed(), final.state

    await harness.task_runs(flow_run.id, {"extract": "COMPLETED", "transform": "FAILED"})

    events = await harness.events(batch_id)
    assert states(events, "extract") == ["pending", "running", "success"]
    assert states(events, "transform")[:3] == ["pending", "running", "failed"]
    assert states(events, "load") == ["pending"]
    assert 0 < sum(step_offsets(events, "transform").values()) <= 500
    last = events[-1]
    assert (last.type, last.state, last.outcome) == ("batch.state", "stop", "failed")
    assert last.reason is not None and "on purpose" in last.reason
    assert not (get_settings().data_root / batch_id / "sales.db").exists()
    steps = (await harness.project(batch_id))["state"]["steps"]
    assert {name: step["state"] for name, step in steps.items()} == {
        "extract": "success", "transform": "failed", "load": "pending"}


async def test_cancelling_a_run_fails_its_running_step_and_stops_cancelled(harness: Harness) -> None:
    # ~20 s per step: the run is surely inside `extract` when it is cancelled
    batch_id, flow_run = await harness.run_inside_extract()
    cancelled_at = time.monotonic()
    await harness.client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
    final = await harness.finished(flow_run.id, timeout=30)
    print(f"\nCancelling -> Cancelled: {time.monotonic() - cancelled_at:.2f}s")
    assert final.state is not None and final.state.is_cancelled(), final.state

    events = await harness.events(batch_id)
    assert states(events, "extract") == ["pending", "running", "failed"]
    assert states(events, "transform") == ["pending"]
    assert 0 < sum(step_offsets(events, "extract").values()) < 4_000
    last = events[-1]
    assert (last.type, last.state, last.outcome) == ("batch.state", "stop", "cancelled")


def engine_pid(flow_run_id: UUID) -> int | None:
    """The flow run's process as the worker started it, found by the flow run id in its
    environment (Linux): the engine itself, or `engine_command` standing in for its fork."""
    needle = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and needle in (entry / "environ").read_bytes().split(b"\0")
                    and any(name in (entry / "cmdline").read_bytes()
                            for name in (b"prefect.engine", b"pipelines.engine_command"))):
                return int(entry.name)
        except OSError:
            continue
    return None


async def test_a_killed_run_crashes_and_its_running_step_fails(harness: Harness) -> None:
    batch_id, flow_run = await harness.run_inside_extract()
    assert (await harness.project(batch_id))["state"]["steps"]["extract"]["state"] == "running"
    pid = await eventually(lambda: engine_pid(flow_run.id))
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGKILL)  # no hook can run in the flow's process now

    final = await harness.finished(flow_run.id, timeout=30)
    assert final.state is not None and final.state.is_crashed(), final.state
    events = await harness.events(batch_id)
    last = events[-1]
    assert (last.type, last.state, last.outcome) == ("batch.state", "stop", "crashed")
    batch = await harness.project(batch_id)
    assert batch["state"]["state"] == "stop"
    assert {name: step["state"] for name, step in batch["state"]["steps"].items()} == {
        "extract": "failed", "transform": "pending", "load": "pending"}


async def test_an_unregistered_version_fails_before_any_step(harness: Harness) -> None:
    await harness.register(demo_spec(name=harness.name, rows=10, throttle=None))
    batch_id, flow_run = await harness.run(version="404")
    final = await harness.finished(flow_run.id)
    assert final.state is not None and final.state.is_failed()
    events = await harness.events(batch_id)
    assert [(e.type, e.state, e.outcome) for e in events] == [("batch.state", "stop", "failed")]
    assert events[0].reason is not None and "not registered" in events[0].reason


async def test_ensure_deployment_is_idempotent_and_enforces_the_parameters(
        harness: Harness, stack: Settings) -> None:
    spec = demo_spec(name=harness.name)
    deployment_id = await harness.register(spec)
    before = await harness.client.read_deployment(deployment_id)
    assert await ensure_deployment(spec, stack) == deployment_id
    after = await harness.client.read_deployment(deployment_id)
    assert after.updated == before.updated  # an up-to-date deployment is only read
    named = await harness.client.read_deployment_by_name(f"{FLOW_NAME}/{harness.name}")
    assert named.id == deployment_id
    assert (named.entrypoint, named.path, named.work_pool_name) == (
        ENTRYPOINT, str(ROOT), stack.work_pool)

    # a changed deployment is updated in place
    await ensure_deployment(spec, stack, job_variables={})
    changed = await harness.client.read_deployment(deployment_id)
    assert changed.job_variables == {}
    assert changed.updated is not None and before.updated is not None
    assert changed.updated > before.updated

    bad: dict[str, Any] = {"batch_id": "b", "pipeline_id": harness.pipeline_id}
    with pytest.raises(PrefectHTTPStatusError) as caught:
        await harness.client.create_flow_run_from_deployment(deployment_id, parameters=bad)
    assert 400 <= caught.value.response.status_code < 500
