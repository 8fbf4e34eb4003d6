"""Helpers for the reconciler's tests (no tests here): a work pool of the test's own that no
worker polls (its runs stay Scheduled), a deployment on it, and batches whose flow runs are
created the way the commands consumer creates them; everything removed afterwards."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from redis.asyncio import Redis

from consumers.plumbing.active import ActiveRuns
from consumers.plumbing.orphans import OrphanOptions
from consumers.reconciler import Reconciler
from core.codec import Event
from core.models import TAG_DHUB, flow_run_tags
from core.settings import Settings
from tests.test_consumers_support import make_spec, new_batch, options, store_for, unique

PARALLEL = 12


@dataclass
class IdlePool:
    """A work pool and deployment of one test; `run()` creates a tagged flow run on it."""

    client: PrefectClient
    redis: Redis
    settings: Settings
    pipeline_id: str
    deployment_id: UUID
    scope_tag: str

    @property
    def scope(self) -> list[str]:
        """Tags only this test's runs carry: a sweep narrowed to them leaves alone the runs
        of everyone else sharing the Prefect server."""
        return [TAG_DHUB, self.scope_tag]

    async def run(self, batch_id: str, pipeline_id: str | None = None) -> str:
        flow_run = await self.client.create_flow_run_from_deployment(
            self.deployment_id, idempotency_key=batch_id,
            tags=[*flow_run_tags(batch_id, pipeline_id or self.pipeline_id, "1"),
                  self.scope_tag],
            parameters={"batch_id": batch_id, "pipeline_id": self.pipeline_id,
                        "pipeline_version": "1"})  # fmt: skip
        return str(flow_run.id)

    async def batch(self) -> str:
        return await new_batch(self.redis, self.settings, self.pipeline_id,
                               make_spec(self.pipeline_id))

    async def scheduled(self, batch_id: str, record: bool = True) -> str:
        """What a run command does: the flow run created, the batch indexed and (unless
        `record` is false, as when that event was lost) its run id recorded."""
        flow_run_id = await self.run(batch_id)
        await ActiveRuns(self.redis).add(self.pipeline_id, batch_id)
        if record:
            await store_for(self.redis, self.settings).apply([Event(
                type="batch.state", batch_id=batch_id, pipeline_id=self.pipeline_id,
                event_id=f"sched-{flow_run_id}", state="scheduled", flow_run_id=flow_run_id)])
        return flow_run_id

    async def many(self, count: int, record: bool = True) -> list[tuple[str, str]]:
        """`count` scheduled batches: [(batch id, flow run id)]."""
        gate = asyncio.Semaphore(PARALLEL)

        async def one() -> tuple[str, str]:
            async with gate:
                batch_id = await self.batch()
                return batch_id, await self.scheduled(batch_id, record)
        return list(await asyncio.gather(*(one() for _ in range(count))))

    async def state_of(self, flow_run_id: str) -> str | None:
        """The run's state type, None once deleted."""
        try:
            run = await self.client.read_flow_run(UUID(flow_run_id))
        except ObjectNotFound:
            return None
        return run.state.type.value if run.state is not None else None


@contextlib.asynccontextmanager
async def idle_pool(settings: Settings, redis: Redis) -> AsyncIterator[IdlePool]:
    name = unique("dhub-test-recon")
    async with PrefectClient(settings.prefect_api_url) as client:
        await client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        try:
            flow_id = await client.create_flow_from_name("run-pipeline")
            deployment_id = await client.create_deployment(
                flow_id=flow_id, name=name, work_pool_name=name)
            pool = IdlePool(client, redis, settings, unique("test-rc"), deployment_id, name)
            try:
                yield pool
            finally:
                await _remove_runs(client, deployment_id)
                with contextlib.suppress(ObjectNotFound):
                    await client.delete_deployment(deployment_id)
        finally:
            with contextlib.suppress(ObjectNotFound):
                await client.delete_work_pool(name)


async def _remove_runs(client: PrefectClient, deployment_id: UUID) -> None:
    """Every run of the deployment, 50 per call (the bulk endpoint's limit)."""
    body = {"flow_runs": {"deployment_id": {"any_": [str(deployment_id)]}}, "limit": 50}
    while (await client._client.post("/flow_runs/bulk_delete", json=body)).json()["deleted"]:
        pass


@contextlib.asynccontextmanager
async def reconciler_without_sweep(settings: Settings, **values: Any) -> AsyncIterator[Reconciler]:
    """A started reconciler whose rounds judge states only (no orphan sweep), with these
    option values; closed on leaving."""
    reconciler = Reconciler(settings, options(**values), orphans=OrphanOptions(enabled=False))
    await reconciler.start()
    try:
        yield reconciler
    finally:
        await reconciler.close()
