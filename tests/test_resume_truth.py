"""A resume tells the truth about its data: what it may override, the batch whose data it
goes on with, and that data kept until it took it over. Real Redis and Kafka (the API in
process), the sales steps run as the flow runs them, on a record built by applying the old
batch's events as the events consumer does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from consumers.rebuild import rebuild
from core import keys
from core.codec import Command, Event
from core.layout import RESUMED_FROM
from core.models import PipelineSpec
from core.packing import unpacked
from core.scripts import Scripts
from core.settings import Settings
from core.store import BatchStore
from pipelines.flow import plan
from pipelines.offsets import OffsetBook
from pipelines.sales.steps import extract, load, transform
from pipelines.sdk import StepContext, StepFailed
from service.appkeys import COMMANDS, STORE
from service.command_sender import Refused
from tests.conftest import eventually
from tests.helpers import AUTH, api_client, api_settings
from tests.test_pipelines_sales import expected_from_source
from tests.test_resume_steps import table

Client = TestClient[Any, Any]
P = "p"
CONFIG: dict[str, Any] = {"rows": 800, "partitions": 2}
SPEC = {"name": "sales-pipeline", "version": "1", "steps": [
    {"name": "extract", "uses": "sales.extract", "config": CONFIG},
    {"name": "transform", "uses": "sales.transform",
     "config": {**CONFIG, "fail_at": "transform"}},
    {"name": "load", "uses": "sales.load", "config": CONFIG}]}
STEPS = {"extract": extract, "transform": transform, "load": load}
GO_ON = {"config": {"transform": {"fail_at": None}}}


@pytest.fixture
async def api(topics: Settings, redis: Redis) -> AsyncIterator[Client]:
    async with api_client(api_settings(topics)) as client:
        assert (await client.put(f"/api/v1/pipelines/{P}", json=SPEC, headers=AUTH)).status == 201
        yield client


async def apply(redis: Redis, batch_id: str, *events: Event) -> None:
    store = BatchStore(redis, Scripts(redis), token_secret=b"t")
    await store.apply([Event(e.type, batch_id, P, event_id=f"{batch_id}-{n}",
                             **{k: v for k, v in e.to_dict().items()
                                if k in ("state", "outcome", "reason", "step", "offsets",
                                         "totals") and v is not None})
                       for n, e in enumerate(events)])


def ev(kind: str, **fields: Any) -> Event:
    return Event(kind, "x", P, **fields)


def context(data_root: Path, step: str, batch_id: str, config: dict[str, Any],
            start: dict[str, int] | None = None, resumed_from: str | None = None
            ) -> StepContext:
    return StepContext(batch_id=batch_id, pipeline_id=P, step=step, config=config,
                       settings=Settings(state_dir=data_root / "state", data_dir=data_root),
                       book=OffsetBook(), on_change=lambda: None, start=start,
                       resumed_from=resumed_from)


async def run_as_the_flow(redis: Redis, data_root: Path, batch_id: str) -> None:
    """`pipelines.flow.run_pipeline`'s steps on the batch's record (events left out)."""
    fields = unpacked(cast(dict[str, str], await redis.hgetall(keys.batch(P, batch_id))))
    for step in plan(PipelineSpec.model_validate(SPEC), fields):
        if not step.done:
            STEPS[step.name](context(data_root, step.name, batch_id, step.config,
                                     start=step.start, resumed_from=fields.get(RESUMED_FROM)))


async def post(api: Client, path: str, **kwargs: Any) -> tuple[int, Any]:
    response = await api.post(path, headers=AUTH, **kwargs)
    return response.status, await response.json()


async def failed_in(api: Client, redis: Redis, data_root: Path, failing: str) -> str:
    """Batch A run for real until `failing` failed half way (its `fail_at`)."""
    status, body = await post(api, f"/api/v1/batches/{P}")
    assert status == 200, body
    a: str = body["item"]
    events = [ev("batch.state", state="running")]
    for step in ("extract", "transform"):
        ctx = context(data_root, step, a, {**CONFIG, "fail_at": failing})
        events.append(ev("step.state", step=step, state="running"))
        try:
            STEPS[step](ctx)
        except StepFailed:
            events += [ev("step.offsets", step=step, offsets=ctx.offsets, totals=ctx.totals),
                       ev("step.state", step=step, state="failed"),
                       ev("batch.state", state="stop", outcome="failed", reason="on purpose")]
            break
        events += [ev("step.offsets", step=step, offsets=ctx.offsets, totals=ctx.totals),
                   ev("step.state", step=step, state="success")]
    await apply(redis, a, *events)
    return a


async def orders_loaded(redis: Redis, data_root: Path, batch_id: str) -> int:
    await run_as_the_flow(redis, data_root, batch_id)
    loaded = table(data_root / batch_id / "sales.db", batch_id)
    assert loaded == expected_from_source(data_root / batch_id)
    return sum(orders for _, orders, _ in loaded.values())


async def test_a_done_steps_config_cannot_be_changed_by_a_resume(
        api: Client, redis: Redis, tmp_path: Path) -> None:
    a = await failed_in(api, redis, tmp_path, "transform")
    before = await redis.zcard(keys.batch_index(P))
    status, body = await post(api, f"/api/v1/batches/{P}/{a}/resume", json={
        "config": {"extract": {"rows": 1000}, "transform": {"fail_at": None}}})
    assert status == 400, body
    problems = body["error"]["details"]["problems"]
    assert [p["loc"] for p in problems] == ["config.extract.rows"]
    assert "done" in problems[0]["msg"]
    assert await redis.zcard(keys.batch_index(P)) == before  # nothing created
    # Restating a done step's value (or its default) changes nothing: accepted.
    status, body = await post(api, f"/api/v1/batches/{P}/{a}/resume", json={
        "config": {"extract": {"rows": 800, "fail_at": None}, "transform": {"fail_at": None}}})
    assert status == 200, body
    assert await orders_loaded(redis, tmp_path, body["item"]) == 800


async def test_a_half_done_step_keeps_the_keys_that_shaped_its_data(
        api: Client, redis: Redis, tmp_path: Path) -> None:
    a = await failed_in(api, redis, tmp_path, "extract")
    status, body = await post(api, f"/api/v1/batches/{P}/{a}/resume", json={
        "config": {"extract": {"partitions": 4, "seed": 1}}})
    assert status == 400, body
    assert [p["loc"] for p in body["error"]["details"]["problems"]] == [
        "config.extract.partitions", "config.extract.seed"]
    # How it runs may change: fail_at (the README's example) and throttle.
    status, body = await post(api, f"/api/v1/batches/{P}/{a}/resume", json={
        "config": {"extract": {"fail_at": None, "throttle": 100_000.0},
                   "transform": {"fail_at": None, "rows": 800}}})
    assert status == 200, body
    assert await orders_loaded(redis, tmp_path, body["item"]) == 800


@pytest.mark.parametrize("b_ended", [
    ("cancelled", "stopped before it started"),
    ("failed", "UnknownStep: no step implementation named 'sales.transform'"),
])
async def test_a_resume_of_a_resume_that_never_ran_a_step_goes_on_from_the_data(
        api: Client, redis: Redis, tmp_path: Path, b_ended: tuple[str, str]) -> None:
    """B (A's resume) stopped before any of its steps ran, so it holds no data: its resume
    C goes on from A's, which B's record describes."""
    a = await failed_in(api, redis, tmp_path, "transform")
    status, body = await post(api, f"/api/v1/batches/{P}/{a}/resume", json=GO_ON)
    assert status == 200, body
    b = body["item"]
    outcome, reason = b_ended
    await apply(redis, b, ev("batch.state", state="stop", outcome=outcome, reason=reason))
    status, body = await post(api, f"/api/v1/batches/{P}/{b}/resume")
    assert status == 200, body
    c = body["item"]
    shown = await (await api.get(f"/api/v1/batches/{P}/{c}", headers=AUTH)).json()
    assert shown["resumed_from"] == a
    assert await orders_loaded(redis, tmp_path, c) == 800


async def test_a_batch_a_live_resume_goes_on_from_cannot_be_deleted(
        api: Client, redis: Redis, tmp_path: Path) -> None:
    a = await failed_in(api, redis, tmp_path, "transform")
    status, body = await post(api, f"/api/v1/batches/{P}/{a}/resume", json=GO_ON)
    assert status == 200, body
    c = body["item"]
    response = await api.delete(f"/api/v1/batches/{P}/{a}", headers=AUTH)
    assert response.status == 409
    refused = (await response.json())["error"]
    assert c in refused["message"] and refused["details"]["resumed_by"] == [c]
    assert (await api.get(f"/api/v1/batches/{P}/{a}", headers=AUTH)).status == 200
    assert await orders_loaded(redis, tmp_path, c) == 800
    # Once the resume stopped (it took the files over), the delete goes through.
    await apply(redis, c, ev("batch.state", state="stop", outcome="completed"))
    assert (await api.delete(f"/api/v1/batches/{P}/{a}", headers=AUTH)).status == 200
    # Its purge (the delete job's) takes the record of its resumes with it.
    await BatchStore(redis, Scripts(redis), token_secret=b"t").purge(P, a)
    assert not await redis.exists(keys.resumed_by(P, a))


async def test_a_resume_whose_data_is_gone_fails_saying_so(tmp_path: Path) -> None:
    ctx = context(tmp_path, "transform", "batch-new", CONFIG, start={"partition_0": 5},
                  resumed_from="batch-gone")
    with pytest.raises(StepFailed, match="batch-gone, which is gone"):
        transform(ctx)
    assert not (tmp_path / "batch-new" / ".inherited").exists()


async def test_a_resume_of_a_resume_whose_data_was_deleted_is_refused(
        api: Client, redis: Redis, tmp_path: Path) -> None:
    """C stopped before it ran a step, so A's delete went through; C holds no data and
    A's is gone: a resume of C has nothing to go on from (409, not a batch that can only
    fail)."""
    a = await failed_in(api, redis, tmp_path, "transform")
    status, body = await post(api, f"/api/v1/batches/{P}/{a}/resume", json=GO_ON)
    c = body["item"]
    await apply(redis, c, ev("batch.state", state="stop", outcome="cancelled", reason="stop"))
    assert (await api.delete(f"/api/v1/batches/{P}/{a}", headers=AUTH)).status == 200
    status, body = await post(api, f"/api/v1/batches/{P}/{c}/resume")
    assert status == 409, body
    assert a in body["error"]["message"]


async def test_a_live_resumes_data_cannot_be_deleted_after_a_rebuild(
        api: Client, redis: Redis, topics: Settings, tmp_path: Path) -> None:
    """A (failed half way) is resumed as C, which has not started. DELETE A is a 409 while
    C lives. After Redis was rebuilt from Kafka (C restored from its run command, with its
    `resumed_from`) the resumed-by set was missing: DELETE A answered 200 and its files were
    removed under C, which could then only fail."""
    a = await failed_in(api, redis, tmp_path, "transform")
    status, body = await post(api, f"/api/v1/batches/{P}/{a}/resume", json=GO_ON)
    assert status == 200, body
    c = body["item"]
    assert (await api.delete(f"/api/v1/batches/{P}/{a}", headers=AUTH)).status == 409
    await redis.flushdb()
    await rebuild(topics, force=True)
    shown = await (await api.get(f"/api/v1/batches/{P}/{c}", headers=AUTH)).json()
    assert shown["resumed_from"] == a and shown["state"] != "stop", shown
    resp = await api.delete(f"/api/v1/batches/{P}/{a}", headers=AUTH)
    assert resp.status == 409, await resp.text()


async def test_a_delete_meeting_a_resume_being_created_is_refused(
        api: Client, redis: Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The resume has noted itself (resumed-by) but its batch is not created yet when the
    DELETE of its holder looks: the delete went through (a member with no batch was taken for
    a resume never created), and the resume then ran on data being removed."""
    a = await failed_in(api, redis, tmp_path, "transform")
    store = cast(Any, api.server).app[STORE]
    release = asyncio.Event()
    create = store.create

    async def held_create(*args: Any, **kwargs: Any) -> int:
        await release.wait()
        return cast(int, await create(*args, **kwargs))
    monkeypatch.setattr(store, "create", held_create)
    resume = asyncio.create_task(post(api, f"/api/v1/batches/{P}/{a}/resume", json=GO_ON))
    await eventually(lambda: redis.scard(keys.resumed_by(P, a)), timeout=10)
    response = await api.delete(f"/api/v1/batches/{P}/{a}", headers=AUTH)
    assert response.status == 409, await response.text()
    release.set()
    status, body = await resume
    assert status == 200, body
    assert (await api.get(f"/api/v1/batches/{P}/{a}", headers=AUTH)).status == 200
    assert await orders_loaded(redis, tmp_path, body["item"]) == 800


async def test_a_resume_meeting_a_delete_under_way_is_refused(
        api: Client, redis: Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The DELETE of A has checked A's resumes (none) and is sending its command when a resume
    of A arrives: the resume was accepted, then A was hidden and its files removed under it."""
    a = await failed_in(api, redis, tmp_path, "transform")
    sender = cast(Any, api.server).app[COMMANDS]
    entered, release = asyncio.Event(), asyncio.Event()
    command = sender.command

    async def held_command(cmd: Command, *args: Any, **kwargs: Any) -> Any:
        if cmd.type == "delete":
            entered.set()
            await release.wait()
        return await command(cmd, *args, **kwargs)
    monkeypatch.setattr(sender, "command", held_command)
    delete = asyncio.create_task(api.delete(f"/api/v1/batches/{P}/{a}", headers=AUTH))
    await asyncio.wait_for(entered.wait(), timeout=10)
    status, body = await post(api, f"/api/v1/batches/{P}/{a}/resume", json=GO_ON)
    assert status == 409, body
    assert "being deleted" in body["error"]["message"]
    assert not await redis.scard(keys.resumed_by(P, a))  # its note taken back
    release.set()
    assert (await delete).status == 200
    # A delete refused by Kafka changes nothing: a resume right after it goes through.
    b = await failed_in(api, redis, tmp_path, "transform")

    async def refused(cmd: Command, *args: Any, **kwargs: Any) -> Any:
        raise Refused()
    monkeypatch.setattr(sender, "command", refused)
    assert (await api.delete(f"/api/v1/batches/{P}/{b}", headers=AUTH)).status == 503
    monkeypatch.setattr(sender, "command", command)
    status, body = await post(api, f"/api/v1/batches/{P}/{b}/resume", json=GO_ON)
    assert status == 200, body


async def test_a_resume_needing_no_data_is_not_refused_because_its_holder_was_deleted(
        api: Client, redis: Redis) -> None:
    """A failed before any step reported an offset (no data to take over); B, its resume,
    was stopped before it ran a step, so A was deleted (B no longer live). A resume of B
    needs no data (`needs_data` False): before today it was accepted. Now
    `resume_may_go_on` refuses it whenever the holder is not visible, saying A 'is being
    deleted' -- every resume of B is refused for good."""
    status, body = await post(api, f"/api/v1/batches/{P}")
    assert status == 200, body
    a = body["item"]
    await apply(redis, a, ev("batch.state", state="running"),
                ev("step.state", step="extract", state="running"),
                ev("step.state", step="extract", state="failed"),
                ev("batch.state", state="stop", outcome="failed", reason="broke at once"))
    status, body = await post(api, f"/api/v1/batches/{P}/{a}/resume")
    assert status == 200, body
    b = body["item"]
    await apply(redis, b, ev("batch.state", state="stop", outcome="cancelled", reason="stop"))
    assert (await api.delete(f"/api/v1/batches/{P}/{a}", headers=AUTH)).status == 200
    status, body = await post(api, f"/api/v1/batches/{P}/{b}/resume")
    assert status == 200, body


async def test_a_resume_refused_by_kafka_does_not_block_the_delete_of_its_holder(
        api: Client, redis: Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resume whose run command Kafka refused answered 503 and its batch was purged
    (service/runs.py `_create_and_queue`), but its note in A's resumed-by set stays; a
    noted member with no batch counts as live for 30 s by its id's time
    (core/store.py `live_resumes`). So DELETE A answers 409 'still needed by its resume C,
    not stopped yet: ... stop it first' -- a C that GET answers 404 and nobody can stop."""
    a = await failed_in(api, redis, tmp_path, "transform")
    sender = cast(Any, api.server).app[COMMANDS]
    command = sender.command

    async def refused(cmd: Command, *args: Any, **kwargs: Any) -> Any:
        if cmd.type == "run":
            raise Refused()
        return await command(cmd, *args, **kwargs)
    monkeypatch.setattr(sender, "command", refused)
    status, body = await post(api, f"/api/v1/batches/{P}/{a}/resume", json=GO_ON)
    assert status == 503, body
    response = await api.delete(f"/api/v1/batches/{P}/{a}", headers=AUTH)
    assert response.status == 200, await response.text()


async def test_a_retried_delete_does_not_let_a_racing_resume_through(
        api: Client, redis: Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README: 'a resume arriving while its batch's DELETE is under way is a 409 too (one of
    the two wins)'. With two DELETEs of A (a client's retry of one that timed out): D2 set
    the `deleting` mark, found no resume and is sending its command; resume R notes itself;
    D1 sets the same mark, sees R, answers 409 and DELETES THE MARK -- D2's. R then reads no
    mark, A still visible, and goes on: R and D2 both answer 200. Root cause:
    core/store.py begin_delete's `redis.delete(mark)` (one shared key, not the holder's own)."""
    a = await failed_in(api, redis, tmp_path, "transform")
    app = cast(Any, api.server).app
    sender, store = app[COMMANDS], app[STORE]
    entered, release = asyncio.Event(), asyncio.Event()
    noted, go_on = asyncio.Event(), asyncio.Event()
    command, note_resume = sender.command, store.note_resume

    async def held_command(cmd: Command, *args: Any, **kwargs: Any) -> Any:
        if cmd.type == "delete":
            entered.set()
            await release.wait()
        return await command(cmd, *args, **kwargs)

    async def held_note(*args: Any) -> None:
        await note_resume(*args)
        noted.set()
        await go_on.wait()
    monkeypatch.setattr(sender, "command", held_command)
    monkeypatch.setattr(store, "note_resume", held_note)
    d2 = asyncio.create_task(api.delete(f"/api/v1/batches/{P}/{a}", headers=AUTH))
    await asyncio.wait_for(entered.wait(), timeout=10)
    resume = asyncio.create_task(post(api, f"/api/v1/batches/{P}/{a}/resume", json=GO_ON))
    await asyncio.wait_for(noted.wait(), timeout=10)
    d1 = await api.delete(f"/api/v1/batches/{P}/{a}", headers=AUTH)
    assert d1.status == 409, await d1.text()  # D1 saw R
    go_on.set()
    status, body = await resume
    release.set()
    d2_status = (await d2).status
    assert not (status == 200 and d2_status == 200), (status, body, d2_status)
