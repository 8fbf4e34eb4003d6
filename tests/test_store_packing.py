"""BatchStore packs a finished batch (core.packing) and unpacks it for a late event, on a
real Redis: every answer stays the same, and no caller of `apply` sees the packed form."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from consumers.events import EventsConsumer
from consumers.plumbing.snapshot_batch import RECORDS
from core import keys
from core.codec import Event
from core.layout import published_fields, render
from core.models import new_batch_id
from core.packer import Packer
from core.packing import PACKED, PLAIN, unpacked
from core.paging import Pager
from core.restore import Restored, restore_batches
from core.scripts import Scripts
from core.settings import Settings
from core.snapshots import NOT_SNAPSHOTTED, Snapshot
from core.store import BatchStore
from tests.conftest import eventually
from tests.helpers import AUTH, api_client, api_settings, spec, spec_body
from tests.test_consumers_support import (
    committed,
    make_spec,
    new_batch,
    options,
    running,
    send,
    unique,
)

P = "pipe"
T0 = 1_760_000_000.123456
PARTS = [f"partition_{n}" for n in range(8)]
STEPS = ("extract", "transform", "load")
# Lua's unpack() in Redis takes fewer than 8,000 values: 3 steps of this many partitions with
# their offsets and totals are 4,020 fields, just past it.
LARGE = [f"partition_{n}" for n in range(670)]


@pytest.fixture
async def store(redis: Redis, scripts: Scripts) -> BatchStore:
    return BatchStore(redis, scripts, token_secret=b"secret", dedup_window=4)


def ev(batch_id: str, kind: str, pipeline_id: str = P, **fields: Any) -> Event:
    return Event(kind, batch_id, pipeline_id, **fields)


def lifecycle(batch_id: str, pipeline_id: str = P, outcome: str = "completed") -> list[Event]:
    """A batch's whole run, offsets at their totals, then its stop (ts T0 + 10)."""
    totals = {part: 1000 + 7 * n for n, part in enumerate(PARTS)}
    out = [ev(batch_id, "batch.state", pipeline_id, state="scheduled", flow_run_id="run-1"),
           ev(batch_id, "batch.state", pipeline_id, state="running")]
    for step in STEPS:
        out += [ev(batch_id, "step.state", pipeline_id, step=step, state="running"),
                ev(batch_id, "step.offsets", pipeline_id, step=step, offsets=totals,
                   totals=totals),
                ev(batch_id, "step.state", pipeline_id, step=step, state="success")]
    out.append(ev(batch_id, "batch.state", pipeline_id, state="stop", outcome=outcome,
                  reason=outcome.capitalize(), ts=T0 + 10))
    return out


async def raw(redis: Redis, batch_id: str, pipeline_id: str = P) -> dict[str, str]:
    return cast(dict[str, str], await redis.hgetall(keys.batch(pipeline_id, batch_id)))


async def finished(store: BatchStore, pipeline_id: str = P) -> str:
    batch_id = new_batch_id()
    await store.create(pipeline_id, batch_id, spec(), {"config": '{"extract":{"rows":5}}'})
    assert (await store.apply(lifecycle(batch_id, pipeline_id)))[(pipeline_id, batch_id)] > 0
    return batch_id


async def large_running(store: BatchStore) -> str:
    """A running batch of 3 steps x LARGE partitions, offsets and totals reported."""
    batch_id = new_batch_id()
    await store.create(P, batch_id, spec())
    parts = {part: 100 for part in LARGE}
    events = [ev(batch_id, "batch.state", state="running")]
    for step in STEPS:
        events += [ev(batch_id, "step.state", step=step, state="running"),
                   ev(batch_id, "step.offsets", step=step, offsets=parts, totals=parts)]
    assert (await store.apply(events))[(P, batch_id)] > 0
    return batch_id


def assert_packed(fields: dict[str, str]) -> None:
    assert PACKED in fields
    assert set(fields) <= PLAIN | {PACKED}


async def answers(store: BatchStore, batch_id: str) -> list[bytes]:
    """Every read of the batch the API serves, as its bytes."""
    page = await store.page(P, 10, None)
    return [orjson.dumps(await store.get(P, batch_id)), orjson.dumps(await store.latest(P)),
            orjson.dumps(page.items),
            orjson.dumps(await store.fields(P, batch_id), option=orjson.OPT_SORT_KEYS)]


async def test_the_apply_that_stops_a_batch_packs_it(store: BatchStore, redis: Redis) -> None:
    batch_id = await finished(store)
    held = await raw(redis, batch_id)
    assert_packed(held)
    batch = await store.get(P, batch_id)
    assert batch is not None
    assert batch["state"]["state"] == "stop"
    assert batch["outcome"] == "completed"
    assert batch["config"] == {"extract": {"rows": 5}}
    assert batch["state"]["steps"]["load"]["offsets"]["partition_7"] == 1049
    assert batch["state"]["steps"]["load"]["progress"]["percent"] == 100.0
    assert not await redis.exists(keys.batch_seen(P, batch_id))


async def test_a_running_batch_is_not_packed(store: BatchStore, redis: Redis) -> None:
    batch_id = new_batch_id()
    await store.create(P, batch_id, spec())
    await store.apply(lifecycle(batch_id)[:-1])
    assert PACKED not in await raw(redis, batch_id)


async def test_every_answer_is_the_same_packed_or_not(store: BatchStore, redis: Redis) -> None:
    batch_id = await finished(store)
    packed = await answers(store, batch_id)
    held = await raw(redis, batch_id)
    await Packer(redis, chunk=100).unpack([(P, batch_id)])
    full = await raw(redis, batch_id)
    assert PACKED not in full
    assert full == unpacked(held)
    assert await answers(store, batch_id) == packed
    await Packer(redis, chunk=100).pack([(P, batch_id)])
    assert await raw(redis, batch_id) == held
    assert await answers(store, batch_id) == packed


async def test_a_late_event_is_applied_to_a_packed_batch_which_is_packed_again(
        store: BatchStore, redis: Redis) -> None:
    batch_id = await finished(store)
    before = unpacked(await raw(redis, batch_id))
    # A late offset beyond the total, and one below it (changes nothing).
    late = ev(batch_id, "step.offsets", step="load", offsets={"partition_0": 5000,
                                                               "partition_1": 3})
    assert await store.apply([late], now="2030-01-01T00:00:00.000Z") == {(P, batch_id): 1}
    held = await raw(redis, batch_id)
    assert_packed(held)
    after = unpacked(held)
    assert after["off:load:partition_0"] == "5000"
    assert after["off:load:partition_1"] == before["off:load:partition_1"]
    assert after["moved:load"] == "2030-01-01T00:00:00.000Z"
    assert int(after["rev"]) == int(before["rev"]) + 1
    assert {k: v for k, v in after.items()
            if k not in ("off:load:partition_0", "moved:load", "rev", "updated_at")} == \
        {k: v for k, v in before.items()
         if k not in ("off:load:partition_0", "moved:load", "rev", "updated_at")}


async def test_late_stops_follow_the_latest_stop_rule_and_leave_the_batch_packed(
        store: BatchStore, redis: Redis) -> None:
    batch_id = await finished(store)

    async def outcome() -> tuple[str | None, str | None]:
        batch = await store.get(P, batch_id)
        assert batch is not None
        return batch["outcome"], batch["reason"]

    # The same stop delivered again, then an older stop: no change.
    [stop] = [e for e in lifecycle(batch_id) if e.type == "batch.state" and e.state == "stop"]
    older = ev(batch_id, "batch.state", state="stop", outcome="cancelled", ts=T0 + 5)
    assert await store.apply([stop]) == {(P, batch_id): 0}
    assert await store.apply([older]) == {(P, batch_id): 0}
    assert_packed(await raw(redis, batch_id))
    assert await outcome() == ("completed", "Completed")
    # A later stop decides.
    later = ev(batch_id, "batch.state", state="stop", outcome="failed", reason="disk", ts=T0 + 20)
    assert await store.apply([later]) == {(P, batch_id): 1}
    held = await raw(redis, batch_id)
    assert_packed(held)
    assert held["outcome"] == "failed"
    assert await outcome() == ("failed", "disk")
    failed = cast(list[str], await redis.zrange(keys.batch_outcome_index(P, "failed"), 0, -1))
    assert failed == [batch_id]


async def test_a_large_batch_takes_its_end_twice_and_a_later_stop_once_packed(
        store: BatchStore, redis: Redis) -> None:
    """More fields than Lua unpacks at once (LARGE). Every run's end comes twice (the bridge's
    with Prefect's time, the flow's hook's with the worker's), and the engine's Completed can
    follow a Cancelled: each reaches the packed batch, which UNPACK deleted and then failed
    to write (the batch was gone: GET 404, not listed, its event dropped)."""
    batch_id = await large_running(store)
    full = await raw(redis, batch_id)
    assert 2 * len(full) > 8000
    bridge = ev(batch_id, "batch.state", state="stop", outcome="cancelled", reason="stopped",
                ts=T0)
    assert await store.apply([bridge]) == {(P, batch_id): 1}
    assert_packed(await raw(redis, batch_id))
    hook = ev(batch_id, "batch.state", state="stop", outcome="cancelled", reason="stopped",
              ts=T0 + 0.2)
    assert await store.apply([hook]) == {(P, batch_id): 0}  # the earlier stop stands
    assert_packed(await raw(redis, batch_id))
    engine = ev(batch_id, "batch.state", state="stop", outcome="completed", ts=T0 + 1)
    assert await store.apply([engine]) == {(P, batch_id): 1}
    held = await raw(redis, batch_id)
    assert_packed(held)
    batch = await store.get(P, batch_id)
    assert batch is not None
    assert (batch["state"]["state"], batch["outcome"], batch["reason"]) == (
        "stop", "completed", None)
    assert len(batch["state"]["steps"]["load"]["offsets"]) == len(LARGE)
    assert list((await store.page(P, 10, None)).items) == [batch_id]  # still listed
    def progress(fields: dict[str, str]) -> dict[str, str]:
        return {name: v for name, v in fields.items() if name.startswith(("off:", "tot:"))}
    assert progress(unpacked(held)) == progress(full)


async def test_a_poll_mixing_packed_running_and_stopping_batches(store: BatchStore,
                                                                 redis: Redis) -> None:
    done = await finished(store)
    running, stopping = new_batch_id(), new_batch_id()
    for batch_id in (running, stopping):
        await store.create(P, batch_id, spec())
    events = [*lifecycle(running)[:4], *lifecycle(stopping),
              ev(done, "step.offsets", step="extract", offsets={"partition_2": 9999})]
    results = await store.apply(events)
    assert results[(P, done)] == 1 and results[(P, running)] > 0 and results[(P, stopping)] > 0
    assert PACKED not in await raw(redis, running)
    assert_packed(await raw(redis, stopping))
    assert_packed(await raw(redis, done))
    fields = await store.fields(P, done)
    assert fields is not None and fields["off:extract:partition_2"] == "9999"


async def test_events_of_a_deleted_packed_batch_are_dropped(store: BatchStore,
                                                           redis: Redis) -> None:
    batch_id = await finished(store)
    assert await store.hide(P, batch_id)
    assert await store.get(P, batch_id) is None
    late = ev(batch_id, "step.offsets", step="load", offsets={"partition_0": 5000})
    assert await store.apply([late]) == {(P, batch_id): -1}
    held = await raw(redis, batch_id)
    assert PACKED in held and held["deleted"] == "1"


async def test_packing_publishes_nothing_and_a_late_change_publishes_the_full_hash(
        redis: Redis, scripts: Scripts) -> None:
    channel = f"test-changes-{uuid.uuid4().hex}"
    store = BatchStore(redis, scripts, token_secret=b"secret", changes_channel=channel)
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(channel)
    try:
        batch_id = await finished(store)  # create, lifecycle (one APPLY_EVENTS), pack
        late = ev(batch_id, "step.offsets", step="load", offsets={"partition_0": 5000})
        await store.apply([late])  # unpack, apply (a change), pack
        await store.apply([late])  # unpack, apply (no change), pack
        await redis.publish(channel, "end")  # after every message the scripts published
        messages: list[str] = []
        while (message := await pubsub.get_message(timeout=5)) is None or message["data"] != "end":
            if message is not None:
                messages.append(message["data"])
        create, stop, change = messages  # nothing else: not the packs, not the unpacks
        assert create == keys.batch(P, batch_id)
        assert stop.startswith(keys.batch(P, batch_id) + "\n")
        key, _, published = change.partition("\n")
        assert key == keys.batch(P, batch_id)
        fields = published_fields(published)
        assert PACKED not in fields
        assert render(fields) == render(unpacked(await raw(redis, batch_id)))
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed since redis 8.2


# -- through the API -------------------------------------------------------------------------


async def test_the_events_consumer_applies_the_later_end_of_a_large_packed_batch(
        topics: Settings, redis: Redis) -> None:
    """End to end: a LARGE batch stopped `cancelled` is packed; the engine's Completed (a later
    ts) on the topic must decide the outcome, where the consumer dropped it (UNPACK deleted
    the hash, then failed) or dead-lettered it (the script's error)."""
    pipeline_id = unique("test-pack")
    batch_id = await new_batch(redis, topics, pipeline_id, make_spec(pipeline_id))
    parts = {part: 100 for part in LARGE}
    events = [ev(batch_id, "batch.state", pipeline_id, state="running")]
    events += [ev(batch_id, "step.offsets", pipeline_id, step=step, offsets=parts, totals=parts)
               for step in STEPS]
    events.append(ev(batch_id, "batch.state", pipeline_id, state="stop", outcome="cancelled",
                     reason="stopped", ts=T0))
    completed = ev(batch_id, "batch.state", pipeline_id, state="stop", outcome="completed",
                   ts=T0 + 1)

    async def consumed(count: int) -> None:
        async def done() -> bool:
            return await committed(topics, topics.group_events, topics.topic_events) >= count
        await eventually(done, timeout=20)

    consumer = EventsConsumer(topics, options())
    async with running(consumer):
        for e in events:
            await send(topics, topics.topic_events, batch_id, e.encode())
        await consumed(len(events))
        assert_packed(await raw(redis, batch_id, pipeline_id))
        await send(topics, topics.topic_events, batch_id, completed.encode())
        await consumed(len(events) + 1)
    fields = unpacked(await raw(redis, batch_id, pipeline_id))
    assert (fields["state"], fields["outcome"]) == ("stop", "completed")
    assert len([name for name in fields if name.startswith("tot:")]) == len(STEPS) * len(LARGE)
    assert (consumer.dead, consumer.dropped) == (0, 0)


@pytest.fixture
async def api(topics: Settings, redis: Redis) -> AsyncIterator[TestClient[Any, Any]]:
    async with api_client(api_settings(topics, api_cache=False)) as client:
        response = await client.put("/api/v1/pipelines/pipeline-sales", json=spec_body(),
                                    headers=AUTH)
        assert response.status == 201
        yield client


async def test_the_api_answers_the_same_for_a_packed_batch(
        api: TestClient[Any, Any], redis: Redis, scripts: Scripts) -> None:
    store = BatchStore(redis, scripts, token_secret=b"secret")
    response = await api.post("/api/v1/batches/pipeline-sales", headers=AUTH)
    assert response.status == 200, await response.text()
    batch_id = (await response.json())["item"]
    await store.apply(lifecycle(batch_id, "pipeline-sales", outcome="failed"))
    assert_packed(await raw(redis, batch_id, "pipeline-sales"))
    paths = [f"/api/v1/batches/pipeline-sales/{batch_id}", "/api/v1/batches/pipeline-sales",
             "/api/v1/batches/pipeline-sales/", "/api/v1/batches/pipeline-sales/?outcome=failed"]

    async def bodies() -> list[bytes]:
        out = []
        for path in paths:
            response = await api.get(path, headers=AUTH)
            assert response.status == 200, path
            out.append(await response.read())
        return out

    packed = await bodies()
    assert orjson.loads(packed[0])["outcome"] == "failed"
    assert orjson.loads(packed[0])["state"]["steps"]["load"]["offsets"]["partition_3"] == 1021
    await Packer(store.redis, chunk=100).unpack([("pipeline-sales", batch_id)])
    assert PACKED not in await raw(redis, batch_id, "pipeline-sales")
    assert await bodies() == packed


async def test_a_packed_batch_is_snapshotted_packed_and_restored_as_it_was(
        store: BatchStore, redis: Redis, scripts: Scripts) -> None:
    """The events consumer's snapshot (built by Redis: RECORDS) carries the packed form, and
    a rebuild writes it back as it is: same hash, same answers."""
    batch_id = await finished(store)
    held = await raw(redis, batch_id)
    before = await answers(store, batch_id)
    [record] = await redis.eval(RECORDS, 1, keys.batch(P, batch_id), P, batch_id,
                                *sorted(NOT_SNAPSHOTTED))
    snapshot = Snapshot.decode(record.encode())
    assert snapshot.fields == held
    await redis.flushdb()
    await restore_batches(redis, store, Pager(redis, scripts, b"secret"), [snapshot], set(),
                          Restored())
    assert await raw(redis, batch_id) == held
    assert await answers(store, batch_id) == before
    # And it takes late events as before.
    late = ev(batch_id, "step.offsets", step="load", offsets={"partition_0": 5000})
    assert await store.apply([late]) == {(P, batch_id): 1}
    assert_packed(await raw(redis, batch_id))


async def test_a_rebuild_packs_a_finished_batch_snapshotted_before_packing(
        store: BatchStore, redis: Redis, scripts: Scripts) -> None:
    batch_id = await finished(store)
    before = await answers(store, batch_id)
    full = unpacked(await raw(redis, batch_id))  # as a snapshot from before packing holds it
    assert PACKED not in full
    await redis.flushdb()
    await restore_batches(redis, store, Pager(redis, scripts, b"secret"),
                          [Snapshot(P, batch_id, full)], set(), Restored())
    assert_packed(await raw(redis, batch_id))
    assert await answers(store, batch_id) == before
