"""Batches that really run: a demo pipeline registered through the chaos API, its flow runs
read back from the chaos Prefect server (its REST API, not the project's gateway under test)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx

from tests.chaos.stackctl import ChaosStack

# Prefect's final state types, and the batch outcome each one must be reported as.
OUTCOME_OF = {"COMPLETED": "completed", "FAILED": "failed", "CANCELLED": "cancelled",
              "CRASHED": "crashed"}
PAGE = 200  # the server's flow-run filter limit


async def register(http: httpx.AsyncClient, chaos: ChaosStack, prefix: str,
                   config: dict[str, Any]) -> str:
    """A new pipeline of the sales steps with `config`, deployed in Prefect; its id."""
    pipeline_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
    spec = {"name": pipeline_id, "version": "1",
            "steps": [{"name": s, "uses": f"sales.{s}", "config": config}
                      for s in ("extract", "transform", "load")]}
    response = await http.put(f"/api/v1/pipelines/{pipeline_id}", json=spec)
    assert response.status_code in (200, 201), response.text
    async with prefect(chaos) as api:
        deadline = time.monotonic() + 60
        while (await api.get(f"/deployments/name/run-pipeline/{pipeline_id}")).status_code != 200:
            assert time.monotonic() < deadline, "the pipeline's deployment never appeared"
            await asyncio.sleep(0.5)
    return pipeline_id


def prefect(chaos: ChaosStack) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=chaos.settings.prefect_api_url, timeout=30)


async def flow_runs(chaos: ChaosStack, tag: str) -> list[dict[str, Any]]:
    """Every flow run carrying `tag` (e.g. `dhub-pipeline:<id>`), all pages."""
    found: list[dict[str, Any]] = []
    async with prefect(chaos) as api:
        while True:
            response = await api.post("/flow_runs/filter", json={
                "flow_runs": {"tags": {"all_": [tag]}}, "limit": PAGE, "offset": len(found),
                "sort": "ID_DESC"})
            response.raise_for_status()
            page = response.json()
            found += page
            if len(page) < PAGE:
                return found


def batch_of(run: dict[str, Any]) -> str | None:
    return next((t.split(":", 1)[1] for t in run["tags"] if t.startswith("dhub-batch:")), None)


def state_type(run: dict[str, Any]) -> str | None:
    return (run.get("state") or {}).get("type")


async def batches(http: httpx.AsyncClient, pipeline_id: str) -> dict[str, dict[str, Any]]:
    """Every listed batch of the pipeline (all pages of the list endpoint)."""
    found: dict[str, dict[str, Any]] = {}
    token: str | None = None
    while True:
        params = {"limit": "1000", **({"token": token} if token else {})}
        response = await http.get(f"/api/v1/batches/{pipeline_id}/", params=params)
        if response.status_code == 404:
            return found
        response.raise_for_status()
        body = response.json()
        found |= body["items"]
        token = body.get("token")
        if not token:
            return found


FINAL = frozenset(OUTCOME_OF)


async def cancel_all(chaos: ChaosStack, tag: str) -> int:
    """Clean-up after a failed scenario: forces every non-final run with `tag` to Cancelled
    so a worker started later does not run them. How many it cancelled."""
    live = [r for r in await flow_runs(chaos, tag) if state_type(r) not in FINAL]
    async with prefect(chaos) as api:
        for run in live:
            await api.post(f"/flow_runs/{run['id']}/set_state", json={
                "state": {"type": "CANCELLED", "name": "Cancelled",
                          "message": "chaos suite clean-up"}, "force": True})
    return len(live)
