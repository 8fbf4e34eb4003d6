"""A batch whose run command was not taken yet when Redis was lost is rebuilt from what the
command recorded (issue 12, part 1), on the real Kafka, Redis and Prefect; and the rules of
that restore (`core.restore_runs`) on their own."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from consumers.commands import CommandsConsumer
from consumers.plumbing.scope import serving
from consumers.rebuild import rebuild
from core import keys
from core.codec import CodecError
from core.command_messages import Command, Recorded, Run
from core.connections import open_redis
from core.restore_runs import from_run_commands
from core.settings import Settings
from core.snapshots import PipelineVersion, Snapshot
from tests.conftest import PrivateRedis, eventually
from tests.helpers import AUTH, api_client, api_settings, spec, spec_body
from tests.test_commands_published import command
from tests.test_consumers_support import Deployer, committed, options, send, unique
from tests.test_rebuild import _answers


async def test_batches_whose_run_command_waits_are_rebuilt_and_then_run(
        topics: Settings, private_redis: PrivateRedis) -> None:
    topics = topics.model_copy(update={"redis_url": private_redis.url})
    settings = api_settings(topics)
    redis = await open_redis(topics)
    deployer = Deployer(topics)  # an idle pool: flow runs wait
    ids: list[str] = []
    try:
        async with api_client(settings) as api:
            name = unique("rebuild-runs")  # the test's own: its deployer's deployment
            for version in ("1", "2"):
                resp = await api.put("/api/v1/pipelines/p-rr", headers=AUTH,
                                     json=spec_body(name=name, version=version,
                                                    steps=("extract", "load")))
                assert resp.status == 201
            # No consumer runs: every run command waits on the topic. One batch with run-time
            # config, one of the older version, one deleted (its delete waits too).
            bodies: list[tuple[dict[str, Any], dict[str, str]]] = [
                ({}, {}), ({"config": {"extract": {"rows": 10}}}, {}), ({}, {"pipeline_version": "1"}),
                ({}, {})]
            for n, (body, params) in enumerate(bodies):
                headers = {**AUTH, "Idempotency-Key": "rebuild-key"} if n == 1 else AUTH
                resp = await api.post("/api/v1/batches/p-rr", headers=headers,
                                      json=body or None, params=params)
                assert resp.status == 200, await resp.text()
                ids.append((await resp.json())["item"])
            resp = await api.delete(f"/api/v1/batches/p-rr/{ids[3]}", headers=AUTH)
            assert resp.status in (200, 202, 204)
        batches = {"p-rr": ids}
        before = await _answers(settings, batches)
        assert before[f"get {ids[1]}"][1]["config"]["extract"]["rows"] == 10
        assert before[f"get {ids[3]}"][0] == 404

        await redis.flushdb()
        restored = await rebuild(topics)
        assert restored.batches == 4 and restored.hidden == 1
        assert await _answers(settings, batches) == before

        # The Idempotency-Key still names its batch: the same POST again makes no other.
        async with api_client(settings) as api:
            resp = await api.post("/api/v1/batches/p-rr", json=bodies[1][0],
                                  headers={**AUTH, "Idempotency-Key": "rebuild-key"})
            assert (resp.status, (await resp.json())["item"]) == (200, ids[1])
            resp = await api.post("/api/v1/batches/p-rr", json={"config": {}},
                                  headers={**AUTH, "Idempotency-Key": "rebuild-key"})
            assert resp.status == 409  # and another request with it is still refused
        assert await _answers(settings, batches) == before
        # The commands consumer then takes the run commands as it would have.
        commands = CommandsConsumer(topics, options(), ensure=deployer.ensure)
        async with api_client(settings) as api, serving([commands], topics, 5.0):
            async def scheduled() -> bool:
                for batch_id in ids[:3]:
                    resp = await api.get(f"/api/v1/batches/p-rr/{batch_id}", headers=AUTH)
                    if (await resp.json())["state"]["state"] != "scheduled":
                        return False
                return True
            await eventually(scheduled, timeout=60, interval=0.2)
    finally:
        await deployer.cleanup(ids)
        await redis.aclose()


async def test_a_published_id_deleted_before_redis_was_lost_stays_deleted(
        topics: Settings, private_redis: PrivateRedis) -> None:
    topics = topics.model_copy(update={"redis_url": private_redis.url})
    redis = await open_redis(topics)
    deployer = Deployer(topics)
    batch_id = unique("batch-pub")
    key = keys.batch("p-pub", batch_id)

    async def publish(kind: str, **fields: Any) -> None:
        await send(topics, topics.topic_commands, batch_id,
                   command(kind, "p-pub", batch_id, **fields))

    async def taken(count: int) -> bool:
        return await committed(topics, topics.group_commands, topics.topic_commands) >= count

    try:
        async with api_client(api_settings(topics)) as api:
            # A name of the test's own: the deployer must not take over the stack's own.
            resp = await api.put("/api/v1/pipelines/p-pub", headers=AUTH,
                                 json=spec_body(name=unique("rebuild-pub"), steps=("extract",)))
            assert resp.status == 201
        consumer = CommandsConsumer(topics, options(cleanup_recheck_s=1.0),
                                    ensure=deployer.ensure)
        async with serving([consumer], topics, 5.0):
            await publish("run", create={})
            await publish("delete")
            await eventually(lambda: taken(2), timeout=30)

            async def purged() -> bool:
                return not await redis.exists(key)
            await eventually(purged, timeout=30, interval=0.3)
        await redis.flushdb()
        await rebuild(topics)
        claim = await redis.get(keys.published(batch_id))
        assert claim is not None and orjson.loads(claim)["deleted"] is True
        # Published again after the rebuild (the group took the first two already): the id
        # names a deleted batch, which stays so.
        await publish("run", create={})
        consumer = CommandsConsumer(topics, options(), ensure=deployer.ensure)
        async with serving([consumer], topics, 5.0):
            await eventually(lambda: taken(3), timeout=30)
        assert not await redis.exists(key)
    finally:
        await deployer.cleanup([batch_id])
        await redis.aclose()


def _run(batch_id: str, version: str, seq: int, at: str) -> Run:
    command = Command("run", batch_id, "p", pipeline_version=version,
                  recorded=Recorded(seq=seq, created_at=at, extra={"config": "{}"}))
    assert isinstance(command, Run)
    return command


AT = "2026-01-01T00:00:05.000Z"


def test_a_recorded_run_names_only_the_fields_a_create_adds() -> None:
    Recorded(seq=1, created_at=AT, extra={"config": "{}", "off:load:p0": "3"})
    for bad in ({"state": "stop"}, {"id": "other"}, {"deleted": "1"}):
        with pytest.raises(CodecError, match=r"recorded\.extra"):
            Recorded(seq=1, created_at=AT, extra=bad)


@pytest.mark.parametrize(("fields", "reason"), [
    # A rebuild raised the pipeline's counter to it: every later POST's INCR failed (500).
    ({"seq": 2**63}, "recorded.seq"),
    ({"created_at": "yesterday"}, "recorded.created_at"),
    # GET of the batch, its pipeline's list and latest answered 500 while it existed.
    ({"extra": {"off:extract:p0": "many"}}, "count of records"),
    ({"extra": {"tot:extract:p0": "-1"}}, "count of records"),
    ({"extra": {"step:extract": "zzz"}}, "step state"),
    ({"extra": {"config": "[1]"}}, "config object"),
    ({"extra": {"resumed_from": "../x"}}, "batch id"),
    ({"idempotency_key": "dhub:batch:p:b"}, "idempotency_key"),
])
def test_a_recorded_run_is_refused_when_a_rebuild_could_not_write_it_as_the_api_did(
        fields: dict[str, Any], reason: str) -> None:
    """What a run command recorded is written as it is by a rebuild (and by the commands
    consumer for a batch Redis lost): each field must be in the form its readers parse."""
    given: dict[str, Any] = {"seq": 1, "created_at": AT, **fields}
    with pytest.raises(CodecError, match=reason):
        Recorded(**given)
    Recorded(seq=2**53 - 1, created_at=AT, idempotency_key=keys.idempotency("ab" * 32),
             extra={"step:extract": "success", "resumed_from": "batch-1",
                    "config": '{"extract": {"rows": 4}}'})


def test_a_restore_from_runs_skips_held_purged_and_unknown_and_keeps_created_at_ordered() -> None:
    versions = [PipelineVersion("p", 1, spec(version="1", steps=("extract",)))]
    held = Snapshot("p", "b-held", {"seq": "2", "created_at": "2026-01-01T00:00:05.000Z",
                                    "rev": "4"})
    runs = {("p", "b-held"): _run("b-held", "1", 2, "2026-01-01T00:00:05.000Z"),
            ("p", "b-purged"): _run("b-purged", "1", 1, "2026-01-01T00:00:01.000Z"),
            ("p", "b-unknown"): _run("b-unknown", "9", 4, "2026-01-01T00:00:09.000Z"),
            # Its API's clock was behind the one that created b-held before it.
            ("p", "b-late"): _run("b-late", "1", 3, "2026-01-01T00:00:04.000Z")}
    out = from_run_commands(runs, versions, [held], purged={("p", "b-purged")})
    assert [s.batch_id for s in out] == ["b-late"]
    fields = out[0].fields
    assert (fields["seq"], fields["state"], fields["step:extract"], fields["config"]) == (
        "3", "pending", "none", "{}")
    assert fields["created_at"] == fields["updated_at"] == "2026-01-01T00:00:05.000Z"
