"""The durable records of issue 12 on real Kafka and Redis: each pipeline version on the
compacted pipelines topic before the PUT answers, and each batch's snapshot written by the
consumers (creation at its run command, every change after the events consumer's apply)."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from redis.asyncio import Redis

from consumers.commands import CommandsConsumer
from consumers.events import EventsConsumer
from consumers.plumbing.scope import serving
from consumers.rebuild_read import read_pipelines, read_snapshots
from core import keys
from core.codec import Event
from core.connections import open_producer
from core.settings import Settings
from core.snapshots import (
    PipelineVersion,
    Snapshot,
    pipeline_key,
    pipeline_record,
    snapshot_key,
    snapshot_record,
)
from core.store import BatchStore
from deploy.local.config import StackConfig
from deploy.local.parts.kafka import _create_topics
from tests.helpers import AUTH, api_client, api_settings, read_topic, spec, spec_body
from tests.test_consumers_support import Deployer, unique


async def test_each_version_is_on_the_pipelines_topic_before_the_put_answers(
        topics: Settings, redis: Redis) -> None:
    async with api_client(api_settings(topics)) as client:
        for version in ("1", "2"):
            resp = await client.put("/api/v1/pipelines/p-durable", headers=AUTH,
                                    json=spec_body(version=version))
            assert resp.status == 201
        again = await client.put("/api/v1/pipelines/p-durable", headers=AUTH,
                                 json=spec_body(version="1"))
        assert again.status == 200
        conflict = await client.put("/api/v1/pipelines/p-durable", headers=AUTH,
                                    json=spec_body(version="2", steps=("extract",)))
        assert conflict.status == 409
    records = await read_topic(topics, topics.topic_pipelines, lambda rs: len(rs) >= 4)
    assert [r.key for r in records] == [b"p-durable/1", b"p-durable/2", b"p-durable/1",
                                        b"p-durable/2"]
    decoded = [PipelineVersion.decode(r.value) for r in records]
    assert [(v.pipeline_id, v.order, v.spec.version) for v in decoded] == [
        ("p-durable", 0, "1"), ("p-durable", 1, "2"), ("p-durable", 0, "1"),
        ("p-durable", 1, "2")]
    # The conflicting body never reached the topic: the 409 writes the registered spec's
    # record again (it repairs a topic a lost race left wrong).
    for registered in (decoded[1], decoded[3]):
        assert [s.name for s in registered.spec.steps] == ["extract", "transform", "load"]


async def test_a_put_kafka_does_not_confirm_is_a_503(topics: Settings, redis: Redis) -> None:
    missing = topics.model_copy(update={"topic_pipelines": f"{topics.topic_pipelines}.absent"})
    async with api_client(api_settings(missing)) as client:
        resp = await client.put("/api/v1/pipelines/p-lost", headers=AUTH, json=spec_body())
        assert resp.status == 503


async def _snapshots(settings: Settings, until: Any) -> dict[bytes, Snapshot | None]:
    records = await read_topic(settings, settings.topic_snapshots,
                               lambda rs: until(_latest(rs)))
    return _latest(records)


def _latest(records: list[Any]) -> dict[bytes, Snapshot | None]:
    out: dict[bytes, Snapshot | None] = {}
    for r in records:
        out[r.key] = Snapshot.decode(r.value) if r.value is not None else None
    return out


async def test_consumers_snapshot_creation_and_every_change(topics: Settings,
                                                            redis: Redis) -> None:
    async with api_client(api_settings(topics)) as client:
        resp = await client.put("/api/v1/pipelines/p-snap", headers=AUTH, json=spec_body())
        assert resp.status == 201
        resp = await client.post("/api/v1/batches/p-snap", headers=AUTH)
        assert resp.status == 200
        batch_id = (await resp.json())["item"]
    key = f"p-snap/{batch_id}".encode()
    # The events consumer alone: a change applied is snapshotted, with its offsets.
    events = EventsConsumer(topics)
    producer = await open_producer(topics)
    try:
        async with serving([events], topics, 5.0):
            for event in (
                Event(type="batch.state", batch_id=batch_id, pipeline_id="p-snap",
                      event_id="e1", state="running"),
                Event(type="step.offsets", batch_id=batch_id, pipeline_id="p-snap",
                      step="extract", offsets={"0": 42}),
            ):
                await producer.send_and_wait(topics.topic_events, event.encode(),
                                             key=batch_id.encode())

            def offsets_seen(latest: dict[bytes, Snapshot | None]) -> bool:
                snap = latest.get(key)
                return snap is not None and snap.fields.get("off:extract:0") == "42"

            latest = await _snapshots(topics, offsets_seen)
    finally:
        await producer.stop()
    snap = latest[key]
    assert snap is not None
    held = await redis.hgetall(keys.batch("p-snap", batch_id))
    held.pop("seen_n", None)
    assert snap.fields == held  # the whole hash, as the poll left it
    assert snap.fields["state"] == "running"
    assert orjson.loads(snap.fields["steps"]) == ["extract", "transform", "load"]


async def test_the_run_command_snapshots_a_pending_batch(topics: Settings, redis: Redis) -> None:
    async with api_client(api_settings(topics)) as client:
        # A name of its own: its run must wait on the Deployer's idle pool, not run on the
        # stack's `run-pipeline/sales-pipeline`.
        resp = await client.put("/api/v1/pipelines/p-create", headers=AUTH,
                                json=spec_body(name=unique("snap")))
        assert resp.status == 201
        resp = await client.post("/api/v1/batches/p-create", headers=AUTH)
        batch_id = (await resp.json())["item"]
    deployer = Deployer(topics)  # an idle pool: the flow run waits, nothing runs it
    commands = CommandsConsumer(topics, ensure=deployer.ensure)
    try:
        async with serving([commands], topics, 5.0):
            latest = await _snapshots(topics, lambda s: f"p-create/{batch_id}".encode() in s)
    finally:
        await deployer.cleanup([batch_id])
    snap = latest[f"p-create/{batch_id}".encode()]
    assert snap is not None
    assert snap.fields["state"] == "pending"
    assert snap.fields["seq"] == "1"
    assert snap.fields["pipeline_version"] == "1"


async def test_the_stack_creates_the_durable_topics_compacted_and_the_others_for_a_week(
        stack: Settings) -> None:
    suffix = uuid.uuid4().hex[:10]
    names = {f: f"test.{suffix}.{f}" for f in ("commands", "events", "dlq", "pipelines",
                                                "snapshots")}
    own = stack.model_copy(update={f"topic_{f}": name for f, name in names.items()})
    await _create_topics(StackConfig(own))
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_configs([
            ConfigResource(ConfigResourceType.TOPIC, name) for name in names.values()])
        # Each resource: (error code, message, type, name, configs).
        configs = {entry[3]: {c[0]: c[1] for c in entry[4]}
                   for response in described for entry in response.resources}
        policy = {name: config["cleanup.policy"] for name, config in configs.items()}
        assert policy == {names["commands"]: "delete", names["events"]: "delete",
                          names["dlq"]: "delete", names["pipelines"]: "compact",
                          names["snapshots"]: "compact"}
        # What a rebuild reads of the commands (deletes of hidden batches) and what a
        # consumer down that long resumes from; tombstones kept a day for slow readers.
        week, day = str(7 * 24 * 3600 * 1000), str(24 * 3600 * 1000)
        for topic in ("commands", "events"):
            assert configs[names[topic]]["retention.ms"] == week
        assert configs[names["snapshots"]]["delete.retention.ms"] == day
    finally:
        await admin.delete_topics(list(names.values()))
        await admin.close()


async def test_a_poll_applied_before_a_crash_is_snapshotted_when_read_again(
        topics: Settings, redis: Redis) -> None:
    """A process that applied a poll and died before its snapshot and commit: the poll is
    read again, changes nothing this time, and its batch is snapshotted all the same."""
    store = BatchStore.from_settings(redis, topics)
    await store.create("p-crash", "batch-crash", spec())
    event = Event(type="step.offsets", batch_id="batch-crash", pipeline_id="p-crash",
                  step="extract", offsets={"0": 5})
    assert await store.apply([event]) == {("p-crash", "batch-crash"): 1}  # the dead process
    producer = await open_producer(topics)
    try:
        await producer.send_and_wait(topics.topic_events, event.encode(), key=b"batch-crash")
    finally:
        await producer.stop()
    events = EventsConsumer(topics)
    async with serving([events], topics, 5.0):
        latest = await _snapshots(topics, lambda s: b"p-crash/batch-crash" in s)
    snap = latest[b"p-crash/batch-crash"]
    assert snap is not None and snap.fields["off:extract:0"] == "5"
    assert events.changed == 0  # applied again, it changed nothing


async def test_a_rebuild_reads_the_latest_record_of_each_key_tombstones_included(
        topics: Settings) -> None:
    producer = await open_producer(topics)
    try:
        for version in ("1", "2"):
            await producer.send_and_wait(topics.topic_pipelines,
                                         pipeline_record("p-t", spec(version=version), 0),
                                         key=pipeline_key("p-t", version))
        await producer.send_and_wait(topics.topic_pipelines, None, key=pipeline_key("p-t", "1"))
        fields = {"id": "b", "rev": "3", "seq": "1"}
        for rev in ("3", "2"):  # a late creation record must not win over a later change
            await producer.send_and_wait(
                topics.topic_snapshots, snapshot_record("p-t", "b", {**fields, "rev": rev}),
                key=snapshot_key("p-t", "b"))
        await producer.send_and_wait(topics.topic_snapshots, snapshot_record("p-t", "gone", fields),
                                     key=snapshot_key("p-t", "gone"))
        await producer.send_and_wait(topics.topic_snapshots, None, key=snapshot_key("p-t", "gone"))
    finally:
        await producer.stop()
    assert [v.spec.version for v in await read_pipelines(topics)] == ["2"]
    assert [(s.batch_id, s.rev) for s in await read_snapshots(topics)] == [("b", 3)]
