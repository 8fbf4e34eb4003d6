"""Deleting a batch removes what its steps wrote in the worker's data area, through the clean-up
each step implementation declares, before the batch is purged from Redis.

The first tests drive the delete job's pass (`Cleanup.one_pass`) on the real Redis and Prefect
with data the real steps wrote; the last runs a sales batch on the whole stack, deletes it
through the API and waits for its directory to go (the stack's consumers must run this tree's
code: restart them after changing consumers/)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from consumers.plumbing.active import ActiveRuns
from consumers.plumbing.cleanup import Cleanup
from consumers.plumbing.prefect_api import PrefectGateway
from core import keys
from core.codec import Event
from core.models import PipelineSpec, StepSpec
from core.settings import Settings
from pipelines.offsets import OffsetBook
from pipelines.sdk import StepContext
from pipelines.steps import resolve
from tests.conftest import eventually
from tests.test_consumers_support import new_batch, options, store_for, unique
from tests.test_e2e import Live, live_api, stopped

__all__ = ["live_api"]  # the fixture, used below


def mixed_spec(name: str) -> PipelineSpec:
    """Steps of both plugins in one pipeline: each plugin's clean-up is called once."""
    return PipelineSpec(name=name, version="1", steps=[
        StepSpec(name="extract", uses="sales.extract", config={"rows": 40, "partitions": 2}),
        StepSpec(name="generate", uses="wordcount.generate", config={"lines": 30}),
        StepSpec(name="count", uses="wordcount.count", config={"lines": 30}),
    ])


def write_data(data_root: Path, pipeline_id: str, batch_id: str, spec: PipelineSpec) -> Path:
    for step in spec.steps:
        resolve(step.uses)(StepContext(
            batch_id=batch_id, pipeline_id=pipeline_id, step=step.name, config=step.config,
            settings=Settings(state_dir=data_root / "state", data_dir=data_root),
            book=OffsetBook(), on_change=lambda: None))
    return data_root / batch_id


async def delete_pass(redis: Redis, settings: Settings, data_root: Path, pipeline_id: str,
                      batch_id: str) -> float | None:
    """One pass of the delete job, its create window already over (the batch has no run),
    the batch hidden first as every delete does (a job meeting a visible batch leaves it
    alone: that batch was created after the delete)."""
    await store_for(redis, settings).hide(pipeline_id, batch_id)
    opts = options(cleanup_recheck_s=0.0)
    gateway = PrefectGateway(settings, opts.prefect_timeout_s)
    await gateway.open()
    try:
        cleanup = Cleanup(redis, gateway, store_for(redis, settings), ActiveRuns(redis), opts,
                          asyncio.Event(), data_root=data_root)
        return await cleanup.one_pass("delete", pipeline_id, batch_id, time.time() - 1)
    finally:
        await gateway.close()


async def test_a_delete_removes_the_batchs_data_then_purges_it(
        test_settings: Settings, redis: Redis, tmp_path: Path) -> None:
    pipeline_id = unique("test-clean")
    spec = mixed_spec(pipeline_id)
    batch_id = await new_batch(redis, test_settings, pipeline_id, spec)
    other_id = await new_batch(redis, test_settings, pipeline_id, spec)
    data = write_data(tmp_path, pipeline_id, batch_id, spec)
    other = write_data(tmp_path, pipeline_id, other_id, spec)
    written = {p.name for p in data.iterdir()}
    assert {"source", "staging", "wordcount"} <= written

    assert await delete_pass(redis, test_settings, tmp_path, pipeline_id, batch_id) is None
    assert not data.exists()
    assert not await redis.exists(keys.batch(pipeline_id, batch_id))
    # Another batch of the same pipeline keeps its data.
    assert {p.name for p in other.iterdir()} == written
    # A pass run again (a re-delivered delete, a pass cut short) finds nothing and is done.
    assert await delete_pass(redis, test_settings, tmp_path, pipeline_id, batch_id) is None


async def test_a_clean_up_that_fails_keeps_the_batch_for_the_next_pass(
        test_settings: Settings, redis: Redis, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline_id = unique("test-clean")
    spec = mixed_spec(pipeline_id)
    batch_id = await new_batch(redis, test_settings, pipeline_id, spec)
    data = write_data(tmp_path, pipeline_id, batch_id, spec)

    def refuse(*args: Any) -> None:
        raise PermissionError("read-only data area")

    monkeypatch.setattr("dhub_wordcount.plugin.remove_batch", refuse)
    with pytest.raises(PermissionError):
        await delete_pass(redis, test_settings, tmp_path, pipeline_id, batch_id)
    # Not purged: the next pass still knows which steps' data to remove.
    assert await redis.exists(keys.batch(pipeline_id, batch_id))
    monkeypatch.undo()
    assert await delete_pass(redis, test_settings, tmp_path, pipeline_id, batch_id) is None
    assert not data.exists() and not await redis.exists(keys.batch(pipeline_id, batch_id))


async def test_a_delete_keeps_the_data_a_live_resume_goes_on_from(
        test_settings: Settings, redis: Redis, tmp_path: Path) -> None:
    """A delete that did not go through the API's check (a published delete command, one
    racing a resume) met a resume of the batch that had not started: the data it goes on
    from was removed under it. The pass now waits for the resume to stop."""
    pipeline_id = unique("test-clean")
    spec = mixed_spec(pipeline_id)
    store = store_for(redis, test_settings)
    holder = await new_batch(redis, test_settings, pipeline_id, spec)
    data = write_data(tmp_path, pipeline_id, holder, spec)
    resume = await new_batch(redis, test_settings, pipeline_id, spec)
    await store.note_resume(pipeline_id, holder, resume)

    again = await delete_pass(redis, test_settings, tmp_path, pipeline_id, holder)
    assert again is not None  # looked at again later
    assert data.exists() and await redis.exists(keys.batch(pipeline_id, holder))
    # Once the resume stopped (it took the files over), the next pass removes and purges.
    await store.apply([Event("batch.state", resume, pipeline_id, event_id="end",
                             state="stop", outcome="completed")])
    assert await delete_pass(redis, test_settings, tmp_path, pipeline_id, holder) is None
    assert not data.exists() and not await redis.exists(keys.batch(pipeline_id, holder))


async def test_a_deleted_sales_batch_leaves_no_data_on_the_stack(live_api: Live) -> None:
    pipeline_id = await live_api.register(rows=600, partitions=2, throttle=None)
    batch_id = await live_api.run(pipeline_id)
    final = await live_api.until(pipeline_id, batch_id, stopped)
    assert final["outcome"] == "completed", final
    data = live_api.settings.data_root / batch_id
    assert (data / "sales.db").exists()

    status, _ = await live_api.call("DELETE", f"/api/v1/batches/{pipeline_id}/{batch_id}")
    assert status == 200
    # The delete job waits for its create window (cleanup_recheck_s) before the last pass.
    await eventually(lambda: not data.exists(), timeout=60, interval=0.2)
    status, _ = await live_api.call("GET", f"/api/v1/batches/{pipeline_id}/{batch_id}")
    assert status == 404
