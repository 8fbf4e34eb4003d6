"""A run command carrying `recorded` (the API's own creation record, part of the published
command.run schema) for a batch id nobody created is taken for a batch Redis lost, and
written from that record (`CommandEffects._restored`). Its values were not judged: a
`created_at` in the year 9999 became every later batch's creation time, an offset that is
no number made GET, the list and latest answer 500, and a config no step takes ran
unchecked. A record whose values a create could not have written is now dead-lettered."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from core import keys
from core.models import PipelineSpec
from core.registry import PipelineRegistry
from core.scripts import Scripts
from tests.conftest import eventually
from tests.helpers import AUTH
from tests.test_commands_published import Client, Ctx, api, ctx, get  # noqa: F401
from tests.test_consumers_support import running


async def test_a_recorded_run_with_a_created_at_far_ahead_poisons_every_later_batch(
        ctx: Ctx, api: Client) -> None:  # noqa: F811
    forged = ctx.new_id()
    consumer = ctx.consumer()
    async with running(consumer):
        await ctx.publish("run", forged, pipeline_version="1",
                          recorded={"seq": 1, "created_at": "9999-12-31T23:59:59.999Z"})
        await ctx.all_processed()
    # Then ordinary POSTs of the pipeline, a while later.
    response = await api.post(f"/api/v1/batches/{ctx.pipeline_id}", headers=AUTH)
    assert response.status == 200, await response.text()
    later = (await response.json())["item"]
    ctx.batches.append(later)
    got = await api.get(f"/api/v1/batches/{ctx.pipeline_id}/{later}", headers=AUTH)
    body: dict[str, Any] = await got.json()
    dead = [k for k, outcome in consumer.handled if outcome == "dead_lettered"]
    assert body["created_at"] < "3000", (
        f"a batch POSTed now reads created_at {body['created_at']} (the forged run command "
        f"was dead-lettered: {bool(dead)})")


async def test_a_recorded_run_with_an_offset_that_is_no_number_breaks_get_and_list(
        ctx: Ctx, api: Client) -> None:  # noqa: F811
    good = ctx.new_id()
    forged = ctx.new_id()
    consumer = ctx.consumer()
    async with running(consumer):
        await ctx.publish("run", good, create={})
        await ctx.publish("run", forged, pipeline_version="1",
                          recorded={"seq": 1, "created_at": "2026-12-05T00:00:00.000Z",
                                    "extra": {"off:extract:p0": "many"}})
        await ctx.all_processed()

    async def answered() -> bool:
        r = await api.get(f"/api/v1/batches/{ctx.pipeline_id}/{good}", headers=AUTH)
        return r.status == 200
    await eventually(answered, timeout=10)
    one = await api.get(f"/api/v1/batches/{ctx.pipeline_id}/{forged}", headers=AUTH)
    page = await api.get(f"/api/v1/batches/{ctx.pipeline_id}/", headers=AUTH)
    latest = await api.get(f"/api/v1/batches/{ctx.pipeline_id}", headers=AUTH)
    dead = [k for k, outcome in consumer.handled if outcome == "dead_lettered"]
    assert (one.status, page.status, latest.status) == (404, 200, 200), (
        f"GET batch {one.status} {await one.text()!r}; list {page.status}; latest "
        f"{latest.status}; forged record dead-lettered: {bool(dead)}")


async def test_a_recorded_run_with_a_config_no_step_takes_is_run_unchecked(
        ctx: Ctx, api: Client) -> None:  # noqa: F811
    """A publisher's `create.config` goes through `effective_config` (refused: dead-lettered);
    the same overrides in `recorded.extra.config` create and run the batch unchecked."""
    forged = ctx.new_id()
    consumer = ctx.consumer()
    async with running(consumer):
        await ctx.publish("run", forged, pipeline_version="1",
                          recorded={"seq": 1, "created_at": "2026-12-05T00:00:00.000Z",
                                    "extra": {"config": '{"extract":{"rows":"lots",'
                                                        '"data_dir":"/etc"},"load":{}}'}})
        await ctx.all_processed()
    got = await api.get(f"/api/v1/batches/{ctx.pipeline_id}/{forged}", headers=AUTH)
    body = await got.json()
    dead = [k for k, outcome in consumer.handled if outcome == "dead_lettered"]
    assert got.status == 404, (
        f"GET {got.status}: state {body['state']['state']}, flow run {body['flow_run_id']}, "
        f"config {body.get('config')}; dead-lettered: {bool(dead)}")


# A diff review found the first version of the config check judging every recorded value as
# if the request had sent it: the lost batch of a version registered before the strict
# JSON-type check (held values, taken by the model alone, as the API takes them) was
# dead-lettered instead of restored.
def lax_spec(name: str, version: str) -> PipelineSpec:
    # As the previous API's PUT left it (lax model_validate took "800" for an int).
    return PipelineSpec.model_validate({"name": name, "version": version, "steps": [
        {"name": "extract", "uses": "sales.extract", "config": {"rows": "800", "seed": 7}},
        {"name": "load", "uses": "sales.load"}]})


async def test_a_lost_batch_of_a_version_with_a_held_lax_value_is_restored(
        ctx: Ctx, api: Client, redis: Redis) -> None:  # noqa: F811
    await PipelineRegistry(redis, Scripts(redis)).register(
        ctx.pipeline_id, lax_spec(ctx.pipeline_id, "2"))
    ids = {}
    for version in ("1", "2"):
        response = await api.post(f"/api/v1/batches/{ctx.pipeline_id}?pipeline_version={version}",
                                  headers=AUTH)
        assert response.status == 200, await response.text()
        ids[version] = (await response.json())["item"]
        ctx.batches.append(ids[version])
    # Redis loses both batches' hashes (no purge mark) before their run commands are taken.
    for batch_id in ids.values():
        await redis.delete(keys.batch(ctx.pipeline_id, batch_id))
    consumer = ctx.consumer()
    async with running(consumer):
        await ctx.processed(2)
    status = {v: (await get(api, ctx.pipeline_id, b))[0] for v, b in ids.items()}
    dead = [k for k, outcome in consumer.handled if outcome == "dead_lettered"]
    assert status == {"1": 200, "2": 200}, (
        f"GET after the restore: {status}; dead-lettered: {dead}")
