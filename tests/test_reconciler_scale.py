"""The reconciler above Prefect's page limits: one round over more live batches than a page
holds, and an orphan sweep over them, on the real Prefect, Redis and Kafka of the stack.

The pages are made smaller here (PAGE, not the server's 200) so that three of them take 100
flow runs, not 600: creating runs is what this test's time goes on. That the server takes a
page of FLOW_RUNS_PAGE and refuses a larger one is checked on its own, without runs."""

from __future__ import annotations

from typing import cast

import httpx
import pytest
from prefect.states import Crashed, Running
from redis.asyncio import Redis

from consumers.plumbing.orphans import OrphanOptions, OrphanSweep
from consumers.plumbing.prefect_api import FLOW_RUNS_PAGE, PrefectGateway
from core import keys
from core.codec import Event, decode_event
from core.packing import unpacked
from core.settings import Settings
from tests.helpers import read_topic
from tests.test_consumers_support import prefect, store_for
from tests.test_reconciler_support import idle_pool, reconciler_without_sweep

PAGE = 40  # the page size the reads are chunked to in this test
LIVE = 100  # two and a half pages
UNRECORDED = 10  # indexed, but the event carrying their run id was lost


async def test_the_server_takes_a_page_of_flow_runs_and_refuses_a_larger_one(
        topics: Settings) -> None:
    async with prefect(topics) as client:
        assert isinstance(await client.read_flow_runs(limit=FLOW_RUNS_PAGE), list)
        with pytest.raises(httpx.HTTPStatusError) as refused:
            await client.read_flow_runs(limit=FLOW_RUNS_PAGE + 1)
    assert refused.value.response.status_code == 422


@pytest.mark.timeout(240)
async def test_a_round_over_more_live_batches_than_a_page_reconciles_each_one(
        topics: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("consumers.plumbing.prefect_api.FLOW_RUNS_PAGE", PAGE)
    monkeypatch.setattr("consumers.plumbing.orphans.FLOW_RUNS_PAGE", PAGE)
    async with idle_pool(topics, redis) as pool:
        recorded = await pool.many(LIVE - UNRECORDED)
        unrecorded = await pool.many(UNRECORDED, record=False)
        # What Prefect knows and Redis does not: a crash among the recorded runs (the
        # last chunk of the read), and for half of the unrecorded ones a crash or a start.
        crashed = recorded[-1]
        await pool.client.set_flow_run_state(crashed[1], Crashed(message="lost"), force=True)
        for _, flow_run_id in unrecorded[:3]:
            await pool.client.set_flow_run_state(flow_run_id, Crashed(message="x"), force=True)
        for _, flow_run_id in unrecorded[3:5]:
            await pool.client.set_flow_run_state(flow_run_id, Running(), force=True)

        async with reconciler_without_sweep(topics, reconcile_batch=500, zombie_after_s=0) as reconciler:
            events = await reconciler.reconcile()

        by_batch = {e.batch_id: e for e in events if e.type == "batch.state"}
        assert by_batch[crashed[0]].outcome == "crashed"
        assert {b: by_batch[b].flow_run_id for b, _ in unrecorded} == dict(unrecorded)
        assert {b for b, _ in unrecorded[:3]} == {
            b for b, e in by_batch.items() if e.outcome == "crashed"} - {crashed[0]}
        assert [by_batch[b].state for b, _ in unrecorded[3:]] == ["running"] * 2 + [
            "scheduled"] * (UNRECORDED - 5)
        assert len(by_batch) == 1 + UNRECORDED  # the other live runs are as Redis says
        # All of it went to Kafka, and applied it records every run id.
        records = await read_topic(topics, topics.topic_events,
                                   lambda rs: len(rs) >= len(events))
        assert sorted(decode_event(r.value).event_id for r in records) == sorted(
            e.event_id for e in events)
        await store_for(redis, topics).apply(events)
        for batch_id, flow_run_id in unrecorded:
            # A crashed one is stopped, so packed: read as every reader does.
            fields = unpacked(cast(dict[str, str], await redis.hgetall(
                keys.batch(pool.pipeline_id, batch_id))))
            assert fields["flow_run_id"] == flow_run_id
        # Every batch was checked this round; none was dropped from the index.
        assert await redis.zcard(keys.ACTIVE_RUNS) == LIVE

        # The orphan sweep pages through all 96 non-final runs (three pages) and finds the
        # three orphans wherever they sort.
        store = store_for(redis, topics)
        (gone, gone_run), (hidden, hidden_run), (stopped, stopped_run) = recorded[:3]
        await redis.delete(keys.batch(pool.pipeline_id, gone))
        assert await store.hide(pool.pipeline_id, hidden)
        await store.apply([Event(type="batch.state", batch_id=stopped, pipeline_id=pool.pipeline_id,
                                 state="stop", outcome="failed", reason="gave up")])
        gateway = PrefectGateway(topics, 10.0)
        await gateway.open()
        try:
            sweep = OrphanSweep(redis, gateway, OrphanOptions(grace_s=0), scope=pool.scope)
            report = await sweep.sweep()
        finally:
            await gateway.close()
        assert (report.examined, report.complete) == (LIVE - 4, True)
        assert sorted(report.cancelled) == sorted([gone_run, hidden_run, stopped_run])
        assert sorted(report.deleted) == sorted([gone_run, hidden_run])
        assert [await pool.state_of(r) for r in (gone_run, hidden_run, stopped_run)] == [
            None, None, "CANCELLED"]
