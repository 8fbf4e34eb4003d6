"""End to end on the whole stack: API -> Kafka -> commands consumer -> Prefect -> worker running
the real sales pipeline -> step events -> Kafka -> events consumer -> Redis -> GET."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import subprocess
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

from core.codec import Command, Event
from core.connections import open_producer
from core.models import TAG_BATCH_PREFIX
from core.settings import ROOT, Settings
from pipelines.sales import demo_spec

pytestmark = pytest.mark.timeout(240)
STEPS = ("extract", "transform", "load")


class Live:
    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.session = session
        self.base = f"http://{settings.api_host}:{settings.api_port}"

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.session.request(method, self.base + path, **kwargs) as response:
            return response.status, await response.json()

    async def register(self, **config: Any) -> str:
        pipeline_id = f"e2e-{uuid.uuid4().hex[:8]}"
        spec = demo_spec(name=pipeline_id, **config)
        status, _ = await self.call("PUT", f"/api/v1/pipelines/{pipeline_id}",
                                    json=spec.model_dump(mode="json"))
        assert status == 201
        return pipeline_id

    async def run(self, pipeline_id: str) -> str:
        status, body = await self.call("POST", f"/api/v1/batches/{pipeline_id}")
        assert status == 200, body
        return str(body["item"])

    async def batch(self, pipeline_id: str, batch_id: str) -> dict[str, Any]:
        status, body = await self.call("GET", f"/api/v1/batches/{pipeline_id}/{batch_id}")
        assert status == 200, body
        return dict(body)

    async def until(self, pipeline_id: str, batch_id: str, done: Any, timeout: float = 90,
                    seen: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            batch = await self.batch(pipeline_id, batch_id)
            if seen is not None:
                seen.append(batch)
            if done(batch):
                return batch
            assert time.monotonic() < deadline, f"batch never got there: {batch}"
            await asyncio.sleep(0.05)


@pytest.fixture
async def live_api(live: Settings) -> AsyncIterator[Live]:
    token = live.static_tokens()[0]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        yield Live(live, session)


async def flow_runs_of(settings: Settings, batch_id: str) -> list[Any]:
    async with PrefectClient(api=settings.prefect_api_url) as client:
        return list(await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[TAG_BATCH_PREFIX + batch_id]))))


def stopped(batch: dict[str, Any]) -> bool:
    return bool(batch["state"]["state"] == "stop")


def expected_totals(source: Path) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """Record counts per partition and revenue per (region, day), computed from the source
    files independently of the pipeline's own code."""
    counts: dict[str, int] = {}
    revenue: dict[tuple[str, str], int] = defaultdict(int)
    for path in sorted(source.glob("partition_*.jsonl")):
        lines = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
        counts[path.stem] = len(lines)
        for rec in lines:
            cents = int(Decimal(rec["unit_price"]) * 100)
            revenue[(rec["region"], rec["ts"][:10])] += rec["quantity"] * cents
    return counts, dict(revenue)


async def test_a_sales_batch_runs_to_completion_with_exact_offsets(live_api: Live) -> None:
    pipeline_id = await live_api.register(rows=3000, partitions=3, throttle=3000)
    batch_id = await live_api.run(pipeline_id)
    seen: list[dict[str, Any]] = []
    final = await live_api.until(pipeline_id, batch_id, stopped, seen=seen)

    assert final["outcome"] == "completed", final
    assert {s: v["state"] for s, v in final["state"]["steps"].items()} == dict.fromkeys(STEPS, "success")
    states = [b["state"]["state"] for b in seen]
    order = ["pending", "scheduled", "running", "stop"]
    assert [order.index(s) for s in states] == sorted(order.index(s) for s in states)
    assert "running" in states, "the watcher never saw the batch running"
    # Throttled to ~1 s a step, so the watcher sees steps running with offsets growing.
    assert any(b["state"]["steps"][s]["state"] == "running" for b in seen for s in STEPS)
    assert any(0 < sum(b["state"]["steps"][s]["offsets"].values()) < 3000 for b in seen for s in STEPS)

    data = live_api.settings.state_dir / "data" / batch_id
    counts, revenue = expected_totals(data / "source")
    assert sum(counts.values()) == 3000 and len(counts) == 3
    for step in STEPS:
        assert final["state"]["steps"][step]["offsets"] == counts, step
    with sqlite3.connect(data / "sales.db") as db:
        rows = db.execute("SELECT region, day, revenue_cents FROM daily_revenue WHERE batch_id = ?",
                          (batch_id,)).fetchall()
    assert {(r, d): c for r, d, c in rows} == revenue
    runs = await flow_runs_of(live_api.settings, batch_id)
    assert [r.state.type.value for r in runs] == ["COMPLETED"]
    assert final["flow_run_id"] == str(runs[0].id)


async def test_a_failing_step_fails_the_batch(live_api: Live) -> None:
    pipeline_id = await live_api.register(rows=600, partitions=2, fail_at="transform")
    batch_id = await live_api.run(pipeline_id)
    final = await live_api.until(pipeline_id, batch_id, stopped)
    steps = {s: v["state"] for s, v in final["state"]["steps"].items()}
    assert steps["extract"] == "success" and steps["transform"] == "failed"
    assert steps["load"] != "success"
    assert final["outcome"] == "failed"


async def test_stop_during_a_throttled_run_cancels_it(live_api: Live) -> None:
    pipeline_id = await live_api.register(rows=20_000, partitions=2, throttle=500)
    batch_id = await live_api.run(pipeline_id)
    await live_api.until(pipeline_id, batch_id,
                         lambda b: sum(b["state"]["steps"]["extract"]["offsets"].values()) > 0)
    status, body = await live_api.call("PUT", f"/api/v1/batches/{pipeline_id}/{batch_id}/stop")
    assert (status, body) == (200, {"message": "Batch stopped successfully"})
    t0 = time.monotonic()
    final = await live_api.until(pipeline_id, batch_id, stopped, timeout=10)
    assert time.monotonic() - t0 < 10
    assert final["outcome"] == "cancelled"

    async def cancelled_in_prefect() -> bool:
        runs = await flow_runs_of(live_api.settings, batch_id)
        return [r.state.type.value for r in runs] == ["CANCELLED"]

    deadline = time.monotonic() + 15
    while not await cancelled_in_prefect():
        assert time.monotonic() < deadline, "the flow run never reached Cancelled in Prefect"
        await asyncio.sleep(0.2)


async def test_delete_of_a_running_batch(live_api: Live) -> None:
    pipeline_id = await live_api.register(rows=20_000, partitions=2, throttle=500)
    batch_id = await live_api.run(pipeline_id)
    await live_api.until(pipeline_id, batch_id, lambda b: b["state"]["state"] == "running")
    status, _ = await live_api.call("DELETE", f"/api/v1/batches/{pipeline_id}/{batch_id}")
    assert status == 200
    status, body = await live_api.call("GET", f"/api/v1/batches/{pipeline_id}/{batch_id}")
    assert status == 404 and body["error"]["code"] == "not_found"
    deadline = time.monotonic() + 15
    while await flow_runs_of(live_api.settings, batch_id):
        assert time.monotonic() < deadline, "a flow run of the deleted batch is still in Prefect"
        await asyncio.sleep(0.2)


async def test_duplicate_commands_and_events_change_nothing(live_api: Live) -> None:
    settings = live_api.settings
    pipeline_id = await live_api.register(rows=300, partitions=2)
    batch_id = await live_api.run(pipeline_id)
    final = await live_api.until(pipeline_id, batch_id, stopped)
    producer: AIOKafkaProducer = await open_producer(settings)
    try:
        # The same run command delivered again (same batch id: Prefect's idempotency key).
        again = Command("run", batch_id, pipeline_id, pipeline_version="1")
        await producer.send_and_wait(settings.topic_commands, again.encode(), key=again.key)
        # An event delivered twice, and an older offset after a newer one.
        twice = Event("step.offsets", batch_id, pipeline_id, step="load",
                      offsets={"partition_0": 10**9})
        older = Event("step.offsets", batch_id, pipeline_id, step="load",
                      offsets={"partition_0": 5})
        for event in (twice, twice, older):
            await producer.send_and_wait(settings.topic_events, event.encode(), key=batch_id.encode())
        # A marker event behind them on the same partition: once it shows, they were applied.
        marker = Event("step.offsets", batch_id, pipeline_id, step="load", offsets={"marker": 1})
        await producer.send_and_wait(settings.topic_events, marker.encode(), key=batch_id.encode())
    finally:
        await producer.stop()
    after = await live_api.until(pipeline_id, batch_id,
                                 lambda b: "marker" in b["state"]["steps"]["load"]["offsets"])
    assert after["state"]["steps"]["load"]["offsets"]["partition_0"] == 10**9
    assert after["state"]["state"] == "stop" and after["outcome"] == final["outcome"]
    runs = await flow_runs_of(settings, batch_id)
    assert len(runs) == 1


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
async def test_the_documented_javascript_client_sees_the_batch_complete(live_api: Live) -> None:
    pipeline_id = await live_api.register(rows=4000, partitions=2, throttle=2000)
    batch_id = await live_api.run(pipeline_id)
    env = {"DHUB_TOKEN": live_api.settings.static_tokens()[0], "POLL_INTERVAL_MS": "1000",
           "PATH": "/usr/bin:/bin:/usr/local/bin"}
    proc = await asyncio.create_subprocess_exec(
        shutil.which("node") or "node", str(ROOT / "tests" / "e2e" / "poll_client.mjs"),
        live_api.base, pipeline_id, batch_id, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    lines = out.decode().splitlines()
    assert proc.returncode == 0, err.decode()
    assert lines[-1] == "Batch completed"
    assert "Batch state: running" in lines
    assert lines[-5:-1] in (
        ["Batch state: stop", " extract: success", " transform: success", " load: success"],
        ["Batch state: running", " extract: success", " transform: success", " load: success"],
    )
