"""Commands an upstream service publishes straight to the commands topic (issue 10, part 5),
on the real Kafka, Redis and Prefect: a `run` carrying its creation request creates the batch
as a POST would (seen by the API's GET and list) and runs it once; invalid ones are
dead-lettered with their reason; a published stop or delete acts as the HTTP call does.

The commands are written here as a publisher would write them: plain JSON, keyed by the
batch id. Deployments live on a work pool no worker polls, so runs stay Scheduled.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from consumers.commands import CommandsConsumer
from consumers.plumbing import dlq
from core import keys
from core.codec import CodecError, Run, decode_command
from core.models import PipelineSpec
from core.packing import unpacked
from core.registry import PipelineRegistry
from core.scripts import Scripts
from core.settings import Settings
from tests.conftest import eventually
from tests.helpers import AUTH, api_client, api_settings, read_topic, swept_at
from tests.test_commands_support import CommandsCtx
from tests.test_consumers_support import (
    Deployer,
    flow_runs,
    prefect,
    running,
    send,
    send_command,
    store_for,
    unique,
)

Client = TestClient[Any, Any]
REGISTERED = {"extract": {"rows": 100, "seed": 7}, "load": {}}


def spec(name: str, version: str = "1") -> PipelineSpec:
    return PipelineSpec.model_validate({"name": name, "version": version, "steps": [
        {"name": "extract", "uses": "sales.extract", "config": REGISTERED["extract"]},
        {"name": "load", "uses": "sales.load"}]})


def command(kind: str, pipeline_id: str, batch_id: str, **fields: Any) -> bytes:
    return orjson.dumps({"schema": 1, "type": kind, "event_id": uuid.uuid4().hex,
                         "batch_id": batch_id, "pipeline_id": pipeline_id, "ts": time.time(),
                         **fields})


class Ctx(CommandsCtx):
    sent = 0

    async def register(self, version: str = "1", pipeline_id: str | None = None) -> None:
        pipeline_id = pipeline_id or self.pipeline_id
        await PipelineRegistry(self.redis, Scripts(self.redis)).register(
            pipeline_id, spec(pipeline_id, version))

    def new_id(self) -> str:
        batch_id = unique("batch-pub")
        self.batches.append(batch_id)
        return batch_id

    async def publish(self, kind: str, batch_id: str, pipeline_id: str | None = None,
                      raw: bytes | None = None, **fields: Any) -> bytes:
        value = raw if raw is not None else command(
            kind, pipeline_id or self.pipeline_id, batch_id, **fields)
        await send(self.settings, self.settings.topic_commands, batch_id, value)
        self.sent += 1
        return value

    async def all_processed(self) -> None:
        await self.processed(self.sent)

    @staticmethod
    def none_dead_lettered(consumer: CommandsConsumer) -> bool:
        return not any(outcome == "dead_lettered" for _, outcome in consumer.handled)

    async def dead_letters(self, count: int) -> dict[bytes, str]:
        """The dead letters' reasons by original value, once `count` are there."""
        records = await read_topic(self.settings, self.settings.topic_dlq,
                                   lambda r: len(r) >= count)
        assert len(records) == count
        return {r.value: dict(r.headers)[dlq.REASON].decode() for r in records}


@pytest.fixture
async def ctx(topics: Settings, redis: Redis) -> AsyncIterator[Ctx]:
    context = Ctx(topics, redis, Deployer(topics), unique("test-pub"))
    await context.register()
    try:
        yield context
    finally:
        await context.deployer.cleanup(context.batches)


@pytest.fixture
async def api(ctx: Ctx) -> AsyncIterator[Client]:
    async with api_client(api_settings(ctx.settings)) as client:
        yield client


async def get(api: Client, pipeline_id: str, batch_id: str) -> tuple[int, Any]:
    response = await api.get(f"/api/v1/batches/{pipeline_id}/{batch_id}", headers=AUTH)
    return response.status, await response.json()


async def listed(api: Client, pipeline_id: str) -> list[str]:
    response = await api.get(f"/api/v1/batches/{pipeline_id}/", headers=AUTH)
    assert response.status == 200
    return list((await response.json())["items"])


async def test_a_published_run_creates_the_batch_as_a_post_and_runs_it_once(
        ctx: Ctx, api: Client) -> None:
    batch_id = ctx.new_id()
    overrides = {"extract": {"rows": 5}}
    consumer = ctx.consumer()
    async with running(consumer):
        await ctx.publish("run", batch_id, create={"config": overrides})
        await ctx.all_processed()
        first = await ctx.fields(batch_id)
        # Published again (a publisher's retry) and delivered again: the same batch.
        await ctx.publish("run", batch_id, create={"config": overrides})
        await ctx.publish("run", batch_id, create={"config": overrides})
        await ctx.all_processed()
    fields = await ctx.fields(batch_id)
    assert fields["state"] == "scheduled" and fields["pipeline_version"] == "1"
    assert fields["created_at"] == first["created_at"] and fields["seq"] == first["seq"]
    effective = {"extract": {"rows": 5, "seed": 7}, "load": {}}
    assert orjson.loads(fields["config"]) == effective
    async with prefect(ctx.settings) as client:
        runs = await flow_runs(client, batch_id)
    assert [str(r.id) for r in runs] == [fields["flow_run_id"]]
    assert runs[0].idempotency_key == batch_id
    assert ctx.deployer.calls == 1

    status, batch = await get(api, ctx.pipeline_id, batch_id)
    assert status == 200
    assert (batch["id"], batch["state"]["state"], batch["pipeline_version"]) == (
        batch_id, "scheduled", "1")
    assert list(batch["state"]["steps"]) == ["extract", "load"]
    assert batch["flow_run_id"] == fields["flow_run_id"]
    assert batch["config"] == effective  # beside the contract's fields, as after a POST
    assert batch_id in await listed(api, ctx.pipeline_id)
    assert ctx.none_dead_lettered(consumer)


async def test_a_published_run_takes_the_latest_version_unless_it_names_one(ctx: Ctx) -> None:
    await ctx.register("2")
    latest, named = ctx.new_id(), ctx.new_id()
    consumer = ctx.consumer()
    async with running(consumer):
        await ctx.publish("run", latest, create={})
        await ctx.publish("run", named, pipeline_version="1", create={})
        await ctx.all_processed()
        # A newer version since: the same command published again is still the same batch.
        await ctx.register("3")
        await ctx.publish("run", latest, create={})
        await ctx.all_processed()
    assert (await ctx.fields(latest))["pipeline_version"] == "2"
    assert (await ctx.fields(named))["pipeline_version"] == "1"
    # No overrides: recorded as a POST without a body records it, the registered config.
    assert orjson.loads((await ctx.fields(latest))["config"]) == REGISTERED
    assert {(await ctx.fields(b))["state"] for b in (latest, named)} == {"scheduled"}
    assert ctx.none_dead_lettered(consumer)


async def test_invalid_published_commands_are_dead_lettered_and_the_consumer_goes_on(
        ctx: Ctx) -> None:
    other = unique("test-pub-other")
    await ctx.register(pipeline_id=other)
    taken = ctx.new_id()
    bad: dict[str, bytes] = {}
    consumer = ctx.consumer()
    async with running(consumer):
        await ctx.publish("run", taken, create={"config": {"extract": {"rows": 5}}})
        await ctx.all_processed()
        bad["no batch- prefix"] = await ctx.publish("run", "pub-1", create={})
        bad["unknown pipeline"] = await ctx.publish("run", ctx.new_id(),
                                                    pipeline_id=unique("nope"), create={})
        bad["unknown version"] = await ctx.publish("run", ctx.new_id(), pipeline_version="9",
                                                   create={})
        bad["bad value"] = await ctx.publish("run", ctx.new_id(),
                                             create={"config": {"extract": {"rows": -1}}})
        bad["unknown step"] = await ctx.publish("run", ctx.new_id(),
                                                create={"config": {"nope": {"rows": 1}}})
        bad["misspelt config"] = await ctx.publish("run", ctx.new_id(),
                                                   create={"confg": {"extract": {"rows": 1}}})
        bad["null create"] = await ctx.publish("run", ctx.new_id(), create=None)
        bad["not JSON"] = await ctx.publish("run", ctx.new_id(), raw=b'{"type": "run", ')
        bad["other config"] = await ctx.publish("run", taken,
                                                create={"config": {"extract": {"rows": 6}}})
        bad["other version"] = await ctx.publish("run", taken, pipeline_version="2",
                                                  create={"config": {"extract": {"rows": 5}}})
        bad["other pipeline"] = await ctx.publish("run", taken, pipeline_id=other, create={})
        good = ctx.new_id()
        await ctx.publish("run", good, create={})
        await ctx.all_processed()
    reasons = await ctx.dead_letters(len(bad))
    assert sum(n for (_, outcome), n in consumer.handled.items()
               if outcome == "dead_lettered") == len(bad)
    expected = {
        "no batch- prefix": "invalid batch_id 'pub-1': a run that creates its batch names it "
                            "'batch-'",
        "unknown pipeline": "run refused: unknown pipeline",
        "unknown version": "run refused: unknown version '9'",
        "bad value": "run refused: config refused: config.extract.rows",
        "unknown step": "run refused: config refused: config.nope: no step named 'nope'",
        "misspelt config": "unknown field `confg`",
        "null create": "got `null` - at `$.create`",
        "not JSON": "malformed command: not JSON",
        "other config": f"run refused: batch {taken} conflicts with the batch of that id "
                        'already created: config {"extract":{"rows":5,"seed":7}',
        "other version": "conflicts with the batch of that id already created: "
                         "pipeline_version '1' (this command: '2')",
        "other pipeline": f"conflicts with the batch of that id already created: "
                          f"pipeline_id '{ctx.pipeline_id}' (this command: '{other}')",
    }
    for what, value in bad.items():
        assert expected[what] in reasons[value], (what, reasons[value])
    # Nothing was created for them; the batch they conflicted with was left as it was.
    for batch_id in ctx.batches:
        if batch_id not in (taken, good):
            assert not await ctx.redis.exists(keys.batch(ctx.pipeline_id, batch_id)), batch_id
    assert not await ctx.redis.exists(keys.batch(other, taken))
    fields = await ctx.fields(taken)
    assert fields["state"] == "scheduled" and "outcome" not in fields
    assert orjson.loads(fields["config"])["extract"]["rows"] == 5
    assert (await ctx.fields(good))["state"] == "scheduled"


async def test_a_published_stop_stops_the_batch_as_the_http_stop_does(ctx: Ctx) -> None:
    batch_id = ctx.new_id()
    async with running(ctx.consumer()):
        # Back to back, keyed alike: the run, then the stop of a batch not yet running.
        await ctx.publish("run", batch_id, create={})
        await ctx.publish("stop", batch_id)
        await ctx.all_processed()
        fields = await ctx.fields(batch_id)
        assert (fields["state"], fields["outcome"]) == ("stop", "cancelled")
        # Published again, run and stop change nothing.
        await ctx.publish("run", batch_id, create={})
        await ctx.publish("stop", batch_id)
        await ctx.all_processed()
    async with prefect(ctx.settings) as client:
        runs = await flow_runs(client, batch_id)
    assert [str(r.id) for r in runs] == [fields["flow_run_id"]]
    assert runs[0].state is not None and runs[0].state.type.value == "CANCELLED"
    assert (await ctx.fields(batch_id))["state"] == "stop"


async def test_a_published_delete_hides_and_deletes_and_the_id_stays_deleted(
        ctx: Ctx, api: Client) -> None:
    batch_id = ctx.new_id()
    consumer = ctx.consumer(cleanup_recheck_s=1.0)
    async with running(consumer):
        await ctx.publish("run", batch_id, create={})
        await ctx.all_processed()
        assert (await get(api, ctx.pipeline_id, batch_id))[0] == 200
        await ctx.publish("delete", batch_id)  # no HTTP DELETE hid it first
        await ctx.all_processed()

        async def gone() -> bool:
            return (await get(api, ctx.pipeline_id, batch_id))[0] == 404
        await eventually(gone, timeout=10)
        assert batch_id not in await listed(api, ctx.pipeline_id)

        async def purged() -> bool:
            async with prefect(ctx.settings) as client:
                runs = await flow_runs(client, batch_id)
            return not runs and not await ctx.redis.exists(
                keys.batch(ctx.pipeline_id, batch_id))
        await eventually(purged, timeout=30, interval=0.3)
        # Published again after the delete: the id names a deleted batch, which stays so.
        await ctx.publish("run", batch_id, create={})
        await ctx.all_processed()
    assert not await ctx.redis.exists(keys.batch(ctx.pipeline_id, batch_id))
    async with prefect(ctx.settings) as client:
        assert await flow_runs(client, batch_id) == []
    claim = await ctx.redis.get(keys.published(batch_id))
    assert claim is not None and orjson.loads(claim)["deleted"] is True
    assert ctx.none_dead_lettered(consumer)


async def test_a_claim_left_by_a_crash_before_the_create_is_completed(ctx: Ctx) -> None:
    """The process stopped between claiming the id and creating the batch: the command's
    redelivery creates it (the claim alone does not mean deleted)."""
    batch_id = ctx.new_id()
    claim = {"pipeline_id": ctx.pipeline_id, "pipeline_version": "1", "config": REGISTERED,
             "deleted": False}
    await ctx.redis.set(keys.published(batch_id), orjson.dumps(claim))
    async with running(ctx.consumer()):
        await ctx.publish("run", batch_id, create={})
        await ctx.all_processed()
    assert (await ctx.fields(batch_id))["state"] == "scheduled"


def readme_commands(root: Path) -> list[tuple[bytes | None, bytes]]:
    """(key, value) of the commands the README's section shows: its JSON example and the
    console producer's `key|value` line."""
    text = (root / "README.md").read_text()
    section = text.split("## Publishing commands to Kafka", 1)[1].split("\n## ", 1)[0]
    [example] = re.findall(r"```json\n(.*?)```", section, re.S)
    [line] = re.findall(r"^echo '([^']*)'", section, re.M)
    key, _, value = line.partition("|")
    return [(None, example.encode()), (key.encode(), value.encode())]


def test_the_readme_commands_decode_as_creating_runs(root: Path) -> None:
    for key, value in readme_commands(root):
        run = decode_command(value)
        assert isinstance(run, Run) and run.creation is not None
        assert key is None or key == run.key


async def test_the_readme_aiokafka_example_starts_and_stops_a_batch(ctx: Ctx, root: Path) -> None:
    """The README's aiokafka code as it stands, on the test's topic and pipeline (and an id
    of its own: Prefect's idempotency keys are shared with the stack's runs)."""
    section = (root / "README.md").read_text().split("## Publishing commands to Kafka", 1)[1]
    [code] = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    batch_id = ctx.new_id()
    await PipelineRegistry(ctx.redis, Scripts(ctx.redis)).register(
        "pipeline-sales", spec(ctx.pipeline_id))
    code = (code.replace("batches.commands", ctx.settings.topic_commands)
            .replace("batch-orders-0002", batch_id))
    consumer = ctx.consumer()
    async with running(consumer):
        process = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
        assert await process.wait() == 0
        ctx.sent += 2
        await ctx.all_processed()
    fields = unpacked(cast(dict[str, str],
                           await ctx.redis.hgetall(keys.batch("pipeline-sales", batch_id))))
    assert (fields["state"], fields["outcome"]) == ("stop", "cancelled")
    assert orjson.loads(fields["config"])["extract"]["rows"] == 5000
    assert ctx.none_dead_lettered(consumer)


def _run(**changes: Any) -> bytes:
    base = orjson.loads(command("run", "pipeline-sales", "batch-orders-1", create={}))
    base.update(changes)
    return orjson.dumps(base)


GOOD_RUNS = [_run(), _run(create={"config": {"extract": {"rows": 5, "x": [1, None]}}}),
             _run(pipeline_version="2", batch_id="batch-" + "a" * 122)]
BAD_RUNS = [_run(batch_id="orders-1"), _run(batch_id="batch-"), _run(create=None),
            _run(batch_id="batch-" + "a" * 123), _run(create={"confg": {}}),
            _run(create={"config": {"extract": 5}}), _run(create={"config": {"a/b": {}}})]


@pytest.mark.parametrize("raw", GOOD_RUNS + BAD_RUNS)
def test_the_published_schema_and_the_decoder_agree_on_creating_runs(raw: bytes) -> None:
    from jsonschema import Draft202012Validator

    from core.jsonschemas import generate

    decoded = True
    try:
        decode_command(raw)
    except CodecError:
        decoded = False
    assert decoded is (raw in GOOD_RUNS)
    for name in ("commands", "command.run"):
        assert Draft202012Validator(generate()[name]).is_valid(orjson.loads(raw)) is decoded


async def test_a_run_published_again_after_retention_removed_its_batch_leaves_it_removed(
        ctx: Ctx) -> None:
    batch_id = ctx.new_id()
    key = keys.batch(ctx.pipeline_id, batch_id)
    async with running(ctx.consumer()):
        await ctx.publish("run", batch_id, create={})
        await ctx.publish("stop", batch_id)
        await ctx.all_processed()
        assert (await ctx.redis.hget(key, "state")) == "stop"
        # 31 days later, the retention sweeper (30 days) removes it; its claim lasts longer
        # when the retention is shorter than the claim's 30 days, as it may be.
        retention = ctx.settings.model_copy(update={"batch_retention_days": 30})
        assert await swept_at(retention, lambda: time.time() + 31 * 86_400) >= 1
        assert not await ctx.redis.exists(key)
        await ctx.publish("run", batch_id, create={})  # its publisher's retry
        await ctx.all_processed()
        # Left removed: not created again as new, no run started for it.
        assert not await ctx.redis.exists(key)
    async with prefect(ctx.settings) as client:
        assert len(await flow_runs(client, batch_id)) == 1


async def test_a_batch_whose_id_ran_long_before_gets_a_flow_run_of_its_own(ctx: Ctx) -> None:
    batch_id = ctx.new_id()
    key = keys.batch(ctx.pipeline_id, batch_id)
    async with running(ctx.consumer()):
        await ctx.publish("run", batch_id, create={})
        await ctx.all_processed()
        earlier_run = await ctx.redis.hget(key, "flow_run_id")
        assert earlier_run
        # Long after, the batch and its claim are gone (retention, the claim's TTL) and a
        # batch of the same id is made: two hours after that run, as far as its clock says.
        store = store_for(ctx.redis, ctx.settings)
        await store.purge(ctx.pipeline_id, batch_id)
        await ctx.redis.delete(keys.published(batch_id))
        spec = await PipelineRegistry(ctx.redis, Scripts(ctx.redis)).get(ctx.pipeline_id, "1")
        assert spec is not None
        await store.create(ctx.pipeline_id, batch_id, spec)
        later = (datetime.now(UTC) + timedelta(hours=2)).isoformat(timespec="milliseconds")
        created_at = later.replace("+00:00", "Z")
        await ctx.redis.hset(key, "created_at", created_at)
        await send_command(ctx.settings, "run", ctx.pipeline_id, batch_id)
        ctx.sent += 1
        await ctx.all_processed()

        async def scheduled() -> bool:
            return await ctx.redis.hget(key, "state") == "scheduled"
        await eventually(scheduled)
        own_run = await ctx.redis.hget(key, "flow_run_id")
    assert own_run and own_run != earlier_run  # not the earlier batch's run
    async with prefect(ctx.settings) as client:
        runs = {str(r.id): r for r in await flow_runs(client, batch_id)}
    assert set(runs) == {earlier_run, own_run}
    assert runs[str(own_run)].idempotency_key == f"{batch_id}@{created_at}"


async def test_a_delete_of_an_unknown_id_does_not_purge_the_batch_created_after_it(
        ctx: Ctx, api: Client) -> None:
    """A delete of an id with no batch "does nothing" (README), yet its clean-up job's last
    pass, after the create window, purged whatever batch held the id by then, and deleted
    its flow run: a batch published after the delete vanished (404) a few seconds later."""
    batch_id = ctx.new_id()
    async with running(ctx.consumer(cleanup_recheck_s=3.0)):
        await ctx.publish("delete", batch_id)
        await ctx.all_processed()
        await ctx.publish("run", batch_id, create={})
        await ctx.all_processed()

        async def scheduled() -> bool:
            return await ctx.redis.hget(keys.batch(ctx.pipeline_id, batch_id),
                                        "state") == "scheduled"
        await eventually(scheduled, timeout=30, interval=0.1)
        await ctx.no_cleanup_left(timeout=30)
    status, body = await get(api, ctx.pipeline_id, batch_id)
    async with prefect(ctx.settings) as client:
        runs = await flow_runs(client, batch_id)
    assert (status, body["state"]["state"], len(runs)) == (200, "scheduled", 1)
