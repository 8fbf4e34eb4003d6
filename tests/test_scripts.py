"""Each Lua script on a real Redis: CREATE_BATCH, HIDE_BATCH, APPLY_EVENTS, REGISTER_PIPELINE."""

from __future__ import annotations

from itertools import chain
from typing import Any, cast

import orjson
import pytest
from redis.asyncio import Redis

from core import keys
from core.api_scripts import ApiScripts
from core.codec import Event
from core.layout import published_fields, render
from core.models import new_batch_id
from core.registry import PipelineRegistry, Registered
from core.scripts import Scripts
from core.store import BatchStore
from tests.conftest import PrivateRedis
from tests.helpers import create_call, spec

P = "pipe"
# Prefect accepts Cancelled -> Running -> Completed: a stop that lands while a worker starts
# the run gives a Cancelled state (t1) before the engine's Completed one (t2 > t1).
T0 = 1_760_000_000.123456


@pytest.fixture
def store(redis: Redis, scripts: Scripts) -> BatchStore:
    return BatchStore(redis, scripts, token_secret=b"secret", dedup_window=4)


async def new_batch(store: BatchStore) -> str:
    batch_id = new_batch_id()
    await store.create(P, batch_id, spec())
    return batch_id


def ev(batch_id: str, kind: str, **fields: Any) -> Event:
    return Event(kind, batch_id, P, **fields)


async def test_create_batch_assigns_increasing_sequences_and_refuses_duplicates(
        store: BatchStore, scripts: Scripts, redis: Redis) -> None:
    first = await new_batch(store)
    second = await new_batch(store)
    assert await redis.zrange(keys.batch_index(P), 0, -1, withscores=True) == [(first, 1.0), (second, 2.0)]
    again = await scripts.create_batch(
        keys=[keys.batch(P, first), keys.batch_index(P), keys.batch_seq(P),
              keys.batch_state_index(P, "pending")],
        args=[first, "state", "x", "created_at", "2030-01-01T00:00:00.000Z"])
    assert again == 0
    assert await redis.hget(keys.batch(P, first), "state") == "pending"


async def test_create_batch_writes_more_values_than_lua_unpacks_at_once(
        store: BatchStore, redis: Redis) -> None:
    """A resumed batch carries its done steps' offsets and totals: 3 steps x 670 partitions
    are 8,000+ values, more than Lua's unpack() takes, and CREATE_BATCH's one HSET of them
    failed (so did the resume). The API's create, CREATE_LATEST_BATCH, runs CREATE_BATCH's
    text."""
    extra = {f"{kind}:{step}:partition_{n}": "100" for kind in ("off", "tot")
             for step in ("extract", "transform", "load") for n in range(670)}
    batch_id = new_batch_id()
    assert await store.create(P, batch_id, spec(), extra) == 1
    held = await redis.hgetall(keys.batch(P, batch_id))
    assert 2 * len(held) > 8000
    assert {name: held[name] for name in extra} == extra
    assert held["seq"] == "1"
    batch_keys, args = await create_call(redis, P, "b2", spec())
    await redis.rpush(keys.pipeline_order(P), spec().version)
    seq = await ApiScripts(redis).create_latest_batch(
        keys=[*batch_keys, keys.pipeline_order(P)],
        args=[spec().version, orjson.dumps([*args, *chain.from_iterable(extra.items())])])
    assert seq == 2
    held = await redis.hgetall(keys.batch(P, "b2"))
    assert {name: held[name] for name in extra} == extra
    assert await redis.zrange(keys.batch_index(P), 0, -1) == [batch_id, "b2"]


async def test_hide_batch_removes_it_from_the_index_once(store: BatchStore, redis: Redis) -> None:
    batch_id = await new_batch(store)
    assert await store.hide(P, batch_id) is True
    assert await store.hide(P, batch_id) is False
    assert await store.hide(P, "batch-unknown") is False
    assert await redis.zcard(keys.batch_index(P)) == 0
    assert await redis.hget(keys.batch(P, batch_id), "deleted") == "1"
    assert await store.get(P, batch_id) is None


async def test_batch_state_only_moves_forward_and_the_latest_stop_decides(
        store: BatchStore) -> None:
    b = await new_batch(store)
    assert await store.apply([ev(b, "batch.state", state="running")]) == {(P, b): 1}
    assert await store.apply([ev(b, "batch.state", state="scheduled")]) == {(P, b): 0}
    await store.apply([ev(b, "batch.state", state="stop", outcome="cancelled", reason="user",
                          ts=T0)])
    await store.apply([ev(b, "batch.state", state="stop", outcome="failed", reason="late",
                          ts=T0 + 1)])
    await store.apply([ev(b, "batch.state", state="running", ts=T0 + 2)])
    batch = await store.get(P, b)
    assert batch is not None
    assert (batch["state"]["state"], batch["outcome"], batch["reason"]) == ("stop", "failed", "late")


async def outcome(store: BatchStore, b: str) -> tuple[str, str | None, str | None]:
    batch = await store.get(P, b)
    assert batch is not None
    return batch["state"]["state"], batch["outcome"], batch["reason"]


async def test_a_later_completed_state_overrides_an_earlier_cancel(store: BatchStore,
                                                                   redis: Redis) -> None:
    b = await new_batch(store)
    cancelled = ev(b, "batch.state", state="stop", outcome="cancelled", reason="stopped",
                   ts=T0)
    assert await store.apply([ev(b, "batch.state", state="running"), cancelled]) == {(P, b): 2}
    rev = await redis.hget(keys.batch(P, b), "rev")
    completed = ev(b, "batch.state", state="stop", outcome="completed", ts=T0 + 0.000001)
    assert await store.apply([completed]) == {(P, b): 1}
    assert await outcome(store, b) == ("stop", "completed", None)
    assert int(await redis.hget(keys.batch(P, b), "rev") or 0) == int(rev or 0) + 1
    assert await redis.hget(keys.batch(P, b), "stop_ts") == repr(T0 + 0.000001)
    # The cancel replayed (or a stop older than the deciding one) changes nothing.
    before = await redis.hgetall(keys.batch(P, b))
    assert await store.apply([cancelled, ev(b, "batch.state", state="stop", outcome="failed",
                                            ts=T0 - 5)]) == {(P, b): 0}
    assert await redis.hgetall(keys.batch(P, b)) == before


async def test_the_latest_stop_decides_whatever_the_order_of_arrival(store: BatchStore) -> None:
    b = await new_batch(store)
    completed = ev(b, "batch.state", state="stop", outcome="completed", ts=T0 + 2)
    cancelled = ev(b, "batch.state", state="stop", outcome="cancelled", reason="stopped",
                   ts=T0 + 1)
    assert await store.apply([completed]) == {(P, b): 1}
    assert await store.apply([cancelled]) == {(P, b): 0}
    assert await outcome(store, b) == ("stop", "completed", None)
    # In one call too, either order.
    for events in ([completed, cancelled], [cancelled, completed]):
        other = await new_batch(store)
        await store.apply([Event(e.type, other, P, state=e.state, outcome=e.outcome,
                                 reason=e.reason, ts=e.ts) for e in events])
        assert await outcome(store, other) == ("stop", "completed", None)


async def test_stops_with_equal_ts_keep_the_first_applied(store: BatchStore) -> None:
    b = await new_batch(store)
    await store.apply([ev(b, "batch.state", state="stop", outcome="cancelled", reason="a", ts=T0),
                       ev(b, "batch.state", state="stop", outcome="completed", ts=T0)])
    assert await outcome(store, b) == ("stop", "cancelled", "a")
    assert await store.apply([ev(b, "batch.state", state="stop", outcome="failed", reason="b",
                                 ts=T0)]) == {(P, b): 0}
    assert await outcome(store, b) == ("stop", "cancelled", "a")


async def test_a_stop_without_ts_counts_as_ts_zero(store: BatchStore, scripts: Scripts,
                                                   redis: Redis) -> None:
    b = await new_batch(store)

    async def raw(outcome: str, ts: str | None = None) -> int:
        stop = ["b", None, "stop", outcome, None, None, ts]
        [changed] = await scripts.apply_events(
            keys=[*keys.batch_filter_indexes(P), keys.batch_finished_index(P), keys.batch(P, b),
                  keys.batch_seen(P, b)],
            args=["2030-01-01T00:00:00Z", 4, "", orjson.dumps([[stop]])])
        return int(changed)

    assert await raw("cancelled") == 1
    assert await redis.hget(keys.batch(P, b), "stop_ts") == "0"
    assert await raw("failed") == 0
    assert await raw("crashed", "1.5") == 1
    assert await outcome(store, b) == ("stop", "crashed", None)
    # The same outcome from a later stop changes nothing visible: no rev, no publish.
    rev = await redis.hget(keys.batch(P, b), "rev")
    assert await raw("crashed", "2.5") == 0
    assert await redis.hget(keys.batch(P, b), "rev") == rev
    assert await redis.hget(keys.batch(P, b), "stop_ts") == "2.5"
    assert await raw("failed", "2") == 0
    assert await outcome(store, b) == ("stop", "crashed", None)


async def test_flow_run_id_is_set_once(store: BatchStore) -> None:
    b = await new_batch(store)
    await store.apply([ev(b, "batch.state", state="scheduled", flow_run_id="fr-1")])
    await store.apply([ev(b, "batch.state", state="scheduled", flow_run_id="fr-2")])
    assert (await store.fields(P, b) or {})["flow_run_id"] == "fr-1"


async def test_step_states_are_ordered_and_an_end_yields_only_to_a_later_one(
        store: BatchStore) -> None:
    b = await new_batch(store)
    events = [ev(b, "step.state", step="extract", state=s, ts=10.0)
              for s in ("running", "pending", "success")]
    events += [ev(b, "step.state", step="extract", state="failed", ts=9.0),  # earlier: ignored
               ev(b, "step.state", step="transform", state="failed", ts=10.0),
               ev(b, "step.state", step="transform", state="success", ts=10.0),  # a tie
               ev(b, "step.state", step="nope", state="running")]
    assert await store.apply(events) == {(P, b): 3}
    batch = await store.get(P, b)
    assert batch is not None
    steps = batch["state"]["steps"]
    assert {k: v["state"] for k, v in steps.items()} == {
        "extract": "success", "transform": "failed", "load": "none"}


async def test_a_failed_run_rerun_to_completion_ends_its_steps_again_in_any_order(
        store: BatchStore) -> None:
    """A failed flow run retried in Prefect (its UI's "Retry") runs the failed step again and
    completes: the batch ended stop/completed with that step `failed` for ever, since a final
    step state never moved. A reconciler's guess (a running step of a dead run, ts 0)
    yields to any real end too."""
    def rerun(b: str) -> list[Event]:
        return [ev(b, "step.state", step="extract", state="success", ts=100.0),
                ev(b, "step.state", step="transform", state="failed", ts=110.0),
                ev(b, "step.state", step="load", state="failed", ts=0.0),  # a guess
                ev(b, "batch.state", state="stop", outcome="failed", ts=111.0),
                ev(b, "step.state", step="transform", state="success", ts=200.0),
                ev(b, "step.state", step="load", state="success", ts=210.0),
                ev(b, "batch.state", state="stop", outcome="completed", ts=211.0)]
    in_order, reversed_, one_by_one = [await new_batch(store) for _ in range(3)]
    await store.apply(rerun(in_order))
    await store.apply(rerun(reversed_)[::-1])
    for event in rerun(one_by_one):
        await store.apply([event])
    for b in (in_order, reversed_, one_by_one):
        batch = await store.get(P, b)
        assert batch is not None
        assert (batch["state"]["state"], batch["outcome"]) == ("stop", "completed")
        assert {k: v["state"] for k, v in batch["state"]["steps"].items()} == dict.fromkeys(
            ("extract", "transform", "load"), "success"), b
    # The same end again changes nothing.
    assert await store.apply(rerun(in_order)[-3:]) == {(P, in_order): 0}


async def test_offsets_only_grow_and_are_exact_beyond_float_digits(store: BatchStore) -> None:
    b = await new_batch(store)
    big = 2**53 - 1
    await store.apply([
        ev(b, "step.offsets", step="extract", offsets={"partition_0": 10, "partition_1": big}),
        ev(b, "step.offsets", step="extract", offsets={"partition_0": 7}),
        ev(b, "step.offsets", step="extract", offsets={"partition_2": 0}),
        ev(b, "step.offsets", step="nope", offsets={"partition_0": 1}),
    ])
    batch = await store.get(P, b)
    assert batch is not None
    assert batch["state"]["steps"]["extract"]["offsets"] == {
        "partition_0": 10, "partition_1": big, "partition_2": 0}
    assert batch["state"]["steps"]["transform"]["offsets"] == {}


async def test_duplicate_event_ids_are_ignored_within_a_bounded_window(store: BatchStore,
                                                                       redis: Redis) -> None:
    b = await new_batch(store)
    once = ev(b, "step.state", step="extract", state="running")
    assert await store.apply([once, once]) == {(P, b): 1}
    # The same event id carrying a later state is still a duplicate: nothing changes.
    replay = ev(b, "step.state", step="extract", state="success", event_id=once.event_id)
    assert await store.apply([replay]) == {(P, b): 0}
    await store.apply([ev(b, "step.state", step="nope", state="running") for _ in range(10)])
    assert await redis.zcard(keys.batch_seen(P, b)) == 4  # the window (dedup_window=4)


async def test_events_for_deleted_or_unknown_batches_are_dropped(store: BatchStore, redis: Redis) -> None:
    b = await new_batch(store)
    await store.hide(P, b)
    result = await store.apply([ev(b, "batch.state", state="running"), ev("batch-x", "batch.state", state="running")])
    assert result == {(P, b): -1, (P, "batch-x"): -1}
    assert await redis.hget(keys.batch(P, b), "state") == "pending"
    assert not await redis.exists(keys.batch(P, "batch-x"))


async def test_a_change_bumps_rev_and_publishes_the_key_and_new_hash(store: BatchStore, redis: Redis) -> None:
    b = await new_batch(store)
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(keys.CHANGES_CHANNEL)
    await pubsub.get_message(timeout=5)  # the subscription's confirmation
    try:
        await store.apply([ev(b, "batch.state", state="running")])
        await store.apply([ev(b, "batch.state", state="running")])  # no change, no message
        # The channel is server-wide (not per database): other processes' changes may pass by.
        mine = keys.batch(P, b)
        messages: list[str] = []
        while (message := await pubsub.get_message(timeout=0.5)) is not None or not messages:
            if message is not None and message["data"].partition("\n")[0] == mine:
                messages.append(message["data"])
        [message] = messages
        # The key, then the hash as the change left it.
        key, _, published = message.partition("\n")
        assert key == mine
        # (Internal fields such as seen_n move without a message; the batch itself does not.)
        stored = cast(dict[str, str], await redis.hgetall(mine))
        assert render(published_fields(published)) == render(stored)
        # As a JSON object of the hash's fields (read by the script as a RESP3 map).
        published_hash = orjson.loads(published)
        assert isinstance(published_hash, dict)
        assert published_hash.pop("seen_n") == "1"  # the second event's id came after it
        assert published_hash == {k: v for k, v in stored.items() if k != "seen_n"}
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed since redis 8.2
    assert await redis.hget(keys.batch(P, b), "rev") == "2"


async def test_register_pipeline_adds_versions_immutably(redis: Redis, scripts: Scripts) -> None:
    registry = PipelineRegistry(redis, scripts)
    assert await registry.register(P, spec()) is Registered.CREATED
    assert await registry.register(P, spec()) is Registered.UNCHANGED
    assert await registry.register(P, spec(steps=("a",))) is Registered.CONFLICT
    assert await registry.register(P, spec(version="2")) is Registered.CREATED
    assert await registry.latest_version(P) == "2"
    assert [s.version for s in await registry.versions(P)] == ["1", "2"]
    assert (await registry.get(P, "1")) == spec()
    assert await registry.get(P, "3") is None
    assert await registry.ids() == [P]
    stored = await redis.hget(keys.pipeline_versions(P), "1")
    assert stored is not None and orjson.loads(stored)["name"] == "sales-pipeline"
    # At a place: added only as the version of that number (a late record's, never after
    # versions registered since); an existing version answers as without one.
    assert await registry.register(P, spec(version="3"), at=1) is Registered.MOVED
    assert await registry.register(P, spec(version="2"), at=0) is Registered.UNCHANGED
    assert await registry.register(P, spec(version="3"), at=2) is Registered.CREATED
    assert [s.version for s in await registry.versions(P)] == ["1", "2", "3"]


async def test_offsets_apply_by_value_whatever_their_event_id(store: BatchStore, redis: Redis) -> None:
    """Offsets are idempotent by value (max): an offsets event is never dropped for its id,
    so a merged event carrying a re-sent id still lands its fresh offsets."""
    b = await new_batch(store)
    first = ev(b, "step.offsets", step="extract", offsets={"p0": 10})
    assert await store.apply([first]) == {(P, b): 1}
    # The same id again, now carrying a fresh partition and a higher offset.
    merged = ev(b, "step.offsets", step="extract", offsets={"p0": 12, "p1": 3},
                event_id=first.event_id)
    assert await store.apply([merged]) == {(P, b): 1}
    assert await store.apply([first, merged]) == {(P, b): 0}  # re-delivered: nothing moves
    batch = await store.get(P, b)
    assert batch is not None
    assert batch["state"]["steps"]["extract"]["offsets"] == {"p0": 12, "p1": 3}
    # Offsets events are not remembered at all: the dedup set holds no id of theirs.
    assert not await redis.exists(keys.batch_seen(P, b))


async def test_coalesced_offsets_ending_with_a_resent_duplicate_keep_fresh_offsets(
        store: BatchStore) -> None:
    b = await new_batch(store)
    old = ev(b, "step.offsets", step="load", offsets={"p0": 5})
    await store.apply([old])
    fresh = ev(b, "step.offsets", step="load", offsets={"p0": 9, "p1": 4})
    resent = ev(b, "step.offsets", step="load", offsets={"p0": 5}, event_id=old.event_id)
    # One poll: merged into one entry, the last one merged being the duplicate.
    assert await store.apply([fresh, resent]) == {(P, b): 1}
    batch = await store.get(P, b)
    assert batch is not None
    assert batch["state"]["steps"]["load"]["offsets"] == {"p0": 9, "p1": 4}


async def test_dedup_ids_are_forgotten_once_the_batch_is_stop(store: BatchStore,
                                                               redis: Redis) -> None:
    b = await new_batch(store)
    running = ev(b, "step.state", step="extract", state="running")
    await store.apply([ev(b, "batch.state", state="running"), running])
    assert await redis.zcard(keys.batch_seen(P, b)) == 2
    stop = ev(b, "batch.state", state="stop", outcome="completed", reason="done", ts=T0)
    assert await store.apply([stop]) == {(P, b): 1}
    assert not await redis.exists(keys.batch_seen(P, b))
    before = await redis.hgetall(keys.batch(P, b))
    assert "seen_n" not in before
    # Duplicates after stop change nothing, and are not remembered either.
    assert await store.apply([running, stop, ev(b, "batch.state", state="running"),
                              ev(b, "batch.state", state="stop", outcome="failed",
                                 ts=T0 - 1)]) == {(P, b): 0}
    assert not await redis.exists(keys.batch_seen(P, b))
    assert await redis.hgetall(keys.batch(P, b)) == before
    # What still may move after stop does so by its own rules, not by id.
    late = ev(b, "step.state", step="extract", state="success")
    assert await store.apply([late, late]) == {(P, b): 1}
    assert not await redis.exists(keys.batch_seen(P, b))
    batch = await store.get(P, b)
    assert batch is not None
    assert (batch["state"]["state"], batch["outcome"], batch["reason"]) == ("stop", "completed", "done")
    assert batch["state"]["steps"]["extract"]["state"] == "success"


async def test_one_apply_spans_pipelines_and_chunks_of_batches(redis: Redis, scripts: Scripts) -> None:
    """`BatchStore.apply` sends one APPLY_EVENTS per pipeline and chunk of its batches; each
    batch gets its own result, in whatever call it went."""
    store = BatchStore(redis, scripts, token_secret=b"secret", apply_chunk=2)
    batches = [await new_batch(store) for _ in range(5)]
    elsewhere = new_batch_id()
    await store.create("pipe-2", elsewhere, spec())
    events = [ev(b, "step.offsets", step="extract", offsets={"p0": n})
              for n, b in enumerate(batches, start=1)]
    events += [Event("batch.state", elsewhere, "pipe-2", state="running"),
               ev("batch-unknown", "batch.state", state="running"),
               ev(batches[4], "step.offsets", step="extract", offsets={"p0": 50}),
               ev(batches[4], "step.state", step="extract", state="running")]
    assert await store.apply(events) == {
        **{(P, b): 1 for b in batches[:4]}, (P, batches[4]): 2,
        ("pipe-2", elsewhere): 1, (P, "batch-unknown"): -1}
    for n, b in enumerate(batches, start=1):
        fields = await store.fields(P, b) or {}
        assert fields["off:extract:p0"] == str(50 if n == 5 else n)
    assert (await store.fields("pipe-2", elsewhere) or {})["state"] == "running"


async def test_a_batch_whose_data_fails_stops_the_call_there(store: BatchStore, redis: Redis) -> None:
    """The batches before it in the call are applied, the ones after it are not (the consumer
    then applies batch by batch: every rule is idempotent)."""
    from redis.exceptions import ResponseError

    first, broken, last = [await new_batch(store) for _ in range(3)]
    await redis.set(keys.batch_seen(P, broken), "not a zset")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await store.apply([ev(b, "batch.state", state="running") for b in (first, broken, last)])
    states = [(await store.fields(P, b) or {})["state"] for b in (first, broken, last)]
    assert states == ["running", "pending", "pending"]


async def test_apply_loads_the_script_again_after_redis_lost_it(private_redis: PrivateRedis) -> None:
    """`apply` sends EVALSHA without asking first (no SCRIPT EXISTS round trip): after Redis
    lost its scripts (a restart, a failover), NOSCRIPT makes it load the script and resend."""
    redis = Redis.from_url(private_redis.url, decode_responses=True)
    try:
        store = BatchStore(redis, Scripts(redis), token_secret=b"secret")
        b = await new_batch(store)
        assert await store.apply([ev(b, "batch.state", state="scheduled")]) == {(P, b): 1}
        await redis.script_flush()
        assert await store.apply([ev(b, "batch.state", state="running")]) == {(P, b): 1}
        assert (await store.fields(P, b) or {})["state"] == "running"
    finally:
        await redis.aclose()


async def test_totals_and_the_times_progress_is_computed_from(
        store: BatchStore, redis: Redis) -> None:
    b = await new_batch(store)
    step = "extract"
    await store.apply([ev(b, "batch.state", state="running"),
                       ev(b, "step.state", step=step, state="running")])
    started = await redis.hget(keys.batch(P, b), "started:" + step)
    assert started is not None
    await store.apply([ev(b, "step.offsets", step=step, offsets={"p0": 10},
                          totals={"p0": 100, "p1": 50}),
                       ev(b, "step.offsets", step="nope", offsets={"p0": 1}, totals={"p0": 9})])
    fields = cast(dict[str, str], await redis.hgetall(keys.batch(P, b)))
    assert (fields["tot:extract:p0"], fields["tot:extract:p1"]) == ("100", "50")
    assert "moved:extract" in fields and fields["started:extract"] == started
    assert not any(name.startswith("tot:nope") for name in fields)  # unknown steps ignored
    rendered = await store.get(P, b)
    assert rendered is not None
    extract = rendered["state"]["steps"][step]
    assert extract["totals"] == {"p0": 100, "p1": 50}
    assert extract["progress"]["percent"] == 6.6  # 10 of 150, rounded down
    # The same totals again change nothing (no new revision, no message).
    rev = fields["rev"]
    await store.apply([ev(b, "step.offsets", step=step, offsets={"p0": 5}, totals={"p0": 100})])
    assert await redis.hget(keys.batch(P, b), "rev") == rev


async def test_a_guessed_failed_never_replaces_a_real_end_nor_a_hash_from_before_ended(
        store: BatchStore, redis: Redis) -> None:
    """The crash hook's and the reconciler's `failed` for a step they saw running carry ts 0:
    a success recorded meanwhile holds. A hash written before `ended:<step>` existed keeps
    its first end, as the rule it was applied under did."""
    b = await new_batch(store)
    await store.apply([ev(b, "step.state", step="extract", state="success", ts=5.0)])
    await store.apply([ev(b, "step.state", step="extract", state="failed", ts=0.0)])
    old = await new_batch(store)
    await store.apply([ev(old, "step.state", step="extract", state="success", ts=5.0)])
    await redis.hdel(keys.batch(P, old), "ended:extract")  # as older code left it
    await store.apply([ev(old, "step.state", step="extract", state="failed", ts=9.0)])
    for batch_id in (b, old):
        assert (await store.fields(P, batch_id) or {})["step:extract"] == "success"
