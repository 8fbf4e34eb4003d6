"""Resume on the whole stack: this test's own API (the code under test) on the stack's
Redis and topics, the stack's consumers, Prefect and worker running the real sales steps.

A sales batch fails on purpose half way through `transform`; its resume, with `fail_at`
turned off by an override, completes: extract is not run again, transform processes exactly
the records that remained (as the step itself counted them), and the loaded totals equal
those of a clean run of the same data."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any
from uuid import UUID

import orjson
import pytest
from aiohttp.test_utils import TestClient
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from core.settings import Settings, get_settings
from pipelines.sales import demo_spec
from tests.helpers import AUTH, api_client, api_settings
from tests.test_pipelines_sales import expected_from_source

pytestmark = pytest.mark.timeout(300)
Client = TestClient[Any, Any]
NO_FAILURE = {"config": {"transform": {"fail_at": None}}}


@pytest.fixture
async def api(live: Settings) -> AsyncIterator[tuple[Client, str]]:
    async with api_client(api_settings(live)) as client:
        pipeline_id = f"resume-{uuid.uuid4().hex[:8]}"
        spec = demo_spec(name=pipeline_id, rows=6_001, partitions=3, throttle=None,
                         fail_at="transform", invalid_rate=0.02)
        response = await client.put(f"/api/v1/pipelines/{pipeline_id}", headers=AUTH,
                                    json=spec.model_dump(mode="json"))
        assert response.status == 201
        yield client, pipeline_id


async def call(api: Client, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    response = await api.request(method, path, headers=AUTH, **kwargs)
    return response.status, await response.json()


async def stopped(api: Client, pipeline_id: str, batch_id: str,
                  timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status, batch = await call(api, "GET", f"/api/v1/batches/{pipeline_id}/{batch_id}")
        assert status == 200, batch
        if batch["state"]["state"] == "stop":
            return dict(batch)
        assert time.monotonic() < deadline, f"the batch never stopped: {batch}"
        await asyncio.sleep(0.1)


def data(batch_id: str) -> Path:
    return get_settings().data_root / batch_id  # where the worker's flow runs write


def loaded(batch_id: str) -> dict[tuple[str, str], tuple[int, int, int]]:
    with closing(sqlite3.connect(data(batch_id) / "sales.db")) as db:
        return {(r[0], r[1]): (r[2], r[3], r[4]) for r in db.execute(
            "SELECT region, day, revenue_cents, orders, units FROM daily_revenue "
            "WHERE batch_id = ?", (batch_id,))}


async def task_runs(settings: Settings, flow_run_id: str) -> set[str]:
    async with PrefectClient(api=settings.prefect_api_url) as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[UUID(flow_run_id)])))
    return {run.name for run in runs}


def states(batch: dict[str, Any]) -> dict[str, str]:
    return {name: step["state"] for name, step in batch["state"]["steps"].items()}


async def test_a_batch_failed_in_transform_resumes_to_the_clean_runs_totals(
        api: tuple[Client, str], live: Settings) -> None:
    client, pipeline_id = api
    status, body = await call(client, "POST", f"/api/v1/batches/{pipeline_id}")
    assert status == 200, body
    old_id = body["item"]
    old = await stopped(client, pipeline_id, old_id)
    assert (old["outcome"], states(old)) == ("failed", {
        "extract": "success", "transform": "failed", "load": "pending"}), old
    half = old["state"]["steps"]["transform"]["offsets"]
    totals = old["state"]["steps"]["transform"]["totals"]
    assert sum(half.values()) == sum(totals.values()) // 2 > 0

    status, body = await call(client, "POST",
                              f"/api/v1/batches/{pipeline_id}/{old_id}/resume", json=NO_FAILURE)
    assert status == 200, body
    new_id = body["item"]
    status, new = await call(client, "GET", f"/api/v1/batches/{pipeline_id}/{new_id}")
    assert status == 200 and new["resumed_from"] == old_id
    assert new["state"]["steps"]["extract"]["state"] == "success"
    assert new["state"]["steps"]["extract"]["offsets"] == old["state"]["steps"]["extract"]["offsets"]
    assert new["state"]["steps"]["transform"]["offsets"] == half
    assert new["config"]["transform"]["fail_at"] is None
    assert new["config"]["extract"]["fail_at"] == "transform"  # untouched: not its name

    final = await stopped(client, pipeline_id, new_id)
    assert (final["outcome"], states(final)) == ("completed", dict.fromkeys(states(final),
                                                                           "success")), final
    assert final["state"]["steps"]["transform"]["offsets"] == totals
    # Extract did not run again; transform processed exactly what remained, by its own count.
    assert await task_runs(live, final["flow_run_id"]) == {"transform", "load"}
    counted = orjson.loads((data(new_id) / "progress" / "transform.json").read_bytes())
    assert counted["processed"] == {p: totals[p] - half[p] for p in totals}

    status, body = await call(client, "POST", f"/api/v1/batches/{pipeline_id}", json=NO_FAILURE)
    assert status == 200, body
    clean_id = body["item"]
    clean = await stopped(client, pipeline_id, clean_id)
    assert clean["outcome"] == "completed", clean
    assert loaded(new_id) == loaded(clean_id) == expected_from_source(data(clean_id))
    assert loaded(new_id), "something was loaded"
