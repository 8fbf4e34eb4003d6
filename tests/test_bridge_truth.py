"""Prefect's run events becoming what GET shows, under odd-but-legal orders and states (found
by review, each failing before its fix): the translation and the apply script on the real
Redis, the reconciler on a real Prefect run that no worker takes."""

from __future__ import annotations

import contextlib
import copy
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast
from uuid import UUID

import orjson
import pytest
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.states import Cancelled, Completed, Pending, Running
from redis.asyncio import Redis

from consumers.commands import CommandsConsumer
from consumers.events import EventsConsumer
from consumers.plumbing.active import ActiveRuns
from consumers.plumbing.prefect_api import EARLIER_BATCH_S, PrefectGateway
from core import keys
from core.codec import Command, Event, decode_event
from core.models import TAG_BATCH_PREFIX, TAG_PIPELINE_PREFIX, flow_run_tags, new_batch_id
from core.prefect_events import TAG_PREFIX, flow_state_event, translate
from core.scripts import Scripts
from core.settings import Settings
from core.store import BatchStore
from pipelines import state_hooks
from pipelines.publisher import EventPublisher
from tests.conftest import eventually
from tests.helpers import spec
from tests.test_consumers_support import options, running, send, send_command
from tests.test_reconciler_support import IdlePool, idle_pool, reconciler_without_sweep

DATA = orjson.loads((Path(__file__).parent / "data" / "prefect_events.json").read_bytes())
P = "bridge-truth"
FLOW_RUN = "ebfd3cfa-3de6-4cdf-93d8-07ee87540d56"  # the captured events' cancelled run


@pytest.fixture
def store(redis: Redis, scripts: Scripts) -> BatchStore:
    return BatchStore(redis, scripts, token_secret=b"secret", dedup_window=4)


async def scheduled_batch(store: BatchStore) -> str:
    batch_id = new_batch_id()
    await store.create(P, batch_id, spec())
    await store.apply([Event("batch.state", batch_id, P, event_id=f"sched-{FLOW_RUN}",
                             state="scheduled", flow_run_id=FLOW_RUN)])
    return batch_id


def captured(name: str, batch_id: str, pipeline_id: str = P) -> dict[str, Any]:
    """A captured Prefect event, its tags naming this test's batch."""
    event: dict[str, Any] = copy.deepcopy(DATA[name])
    for related in event["related"]:
        rid = related["prefect.resource.id"]
        if rid.startswith(TAG_PREFIX + TAG_BATCH_PREFIX):
            related["prefect.resource.id"] = TAG_PREFIX + TAG_BATCH_PREFIX + batch_id
        elif rid.startswith(TAG_PREFIX + TAG_PIPELINE_PREFIX):
            related["prefect.resource.id"] = TAG_PREFIX + TAG_PIPELINE_PREFIX + pipeline_id
    return event


async def state_of(store: BatchStore, batch_id: str) -> str:
    batch = await store.get(P, batch_id)
    assert batch is not None
    state: str = batch["state"]["state"]
    return state


async def test_a_run_cancelled_before_it_started_never_shows_running(store: BatchStore) -> None:
    """A stop's follow-up cancels a run a worker claimed (Pending) but never started: Prefect
    moves Pending -> Cancelling (only a Scheduled run goes straight to Cancelled), and the
    batch showed `running` until the run was ended Cancelled, up to two minutes later, though
    it never ran."""
    batch_id = await scheduled_batch(store)
    cancelling = captured("flow_run_cancelling", batch_id)
    cancelling["payload"]["intended"]["from"] = "PENDING"
    cancelling["payload"]["initial_state"] = {"type": "PENDING", "name": "Pending"}
    await store.apply(translate(cancelling))
    assert await state_of(store, batch_id) == "scheduled"
    # A run cancelled while it ran was running: Cancelling says so, should its Running be lost.
    ran = await scheduled_batch(store)
    await store.apply(translate(captured("flow_run_cancelling", ran)))
    assert await state_of(store, ran) == "running"


@pytest.mark.timeout(90)
async def test_the_reconciler_does_not_call_a_never_started_cancelling_run_running(
        topics: Settings, redis: Redis) -> None:
    async with idle_pool(topics, redis) as pool:
        batch_id = await pool.batch()
        flow_run_id = await pool.scheduled(batch_id)
        # A worker claimed it; the stop's follow-up then asked for its cancellation.
        await pool.client.set_flow_run_state(UUID(flow_run_id), Pending(), force=True)
        async with reconciler_without_sweep(topics, zombie_after_s=0) as reconciler:
            assert reconciler.prefect is not None
            [run] = (await reconciler.prefect.read([flow_run_id])).values()
            cancelling = await reconciler.prefect.cancel(run, "stopped through the batches API")
            assert (cancelling.state_type, cancelling.ran) == ("CANCELLING", False)
            events = await reconciler.reconcile()
    assert [e.state for e in events if e.batch_id == batch_id] == []


class CapturingProducer:
    """Stands for the hook's Kafka producer: keeps what it is sent."""

    def __init__(self) -> None:
        self.sent: list[Event] = []

    async def send_and_wait(self, topic: str, value: bytes | None = None,
                            key: bytes | None = None) -> None:
        assert value is not None
        self.sent.append(decode_event(value))

    async def stop(self) -> None:
        pass


def hook_publisher(monkeypatch: pytest.MonkeyPatch) -> CapturingProducer:
    """The flow's stop hooks publishing into a `CapturingProducer`, no step swept."""
    producer = CapturingProducer()

    @contextlib.asynccontextmanager
    async def publisher(settings: Settings, batch: str, pipeline: str,
                        **_: float) -> AsyncIterator[EventPublisher]:
        yield EventPublisher(producer, "events", batch, pipeline)

    async def no_steps(*_: Any) -> set[str]:
        return set()

    monkeypatch.setattr(state_hooks, "open_publisher", publisher)
    monkeypatch.setattr(state_hooks, "unfinished_steps", no_steps)
    return producer


async def run_hook(name: str, batch_id: str, state: State[Any]) -> None:
    flow_run = FlowRun(id=UUID(FLOW_RUN), flow_id=uuid.uuid4(),
                       parameters={"batch_id": batch_id, "pipeline_id": P})
    hook = cast(Callable[..., Awaitable[None]], getattr(state_hooks, name))
    await hook(None, flow_run, state)


@pytest.mark.parametrize(("hook", "state_type", "message"), [
    ("on_completion", "COMPLETED", ""),
    ("on_completion", "COMPLETED", None),
    ("on_failure", "FAILED", ""),
    ("on_failure", "FAILED", "Flow run encountered an exception: " + "x" * 2100),
])
async def test_a_runs_hook_and_its_bridged_state_say_the_same_whatever_comes_first(
        store: BatchStore, monkeypatch: pytest.MonkeyPatch, hook: str, state_type: str,
        message: str | None) -> None:
    """A run's end arrives twice, as its hook's stop and as the bridge's translation of the
    same Prefect state, with the same time: the first applied decides between equal times,
    so the two must agree, or GET's reason depends on which came first (a completed batch
    said `Completed` or nothing; a long failure message ended in `…` or not)."""
    producer = hook_publisher(monkeypatch)
    entered = time.time() - 5
    state: State[Any] = State(type=StateType(state_type), message=message,
                              timestamp=datetime.fromtimestamp(entered, UTC))
    ours = await scheduled_batch(store)
    await run_hook(hook, ours, state)
    [hooked] = producer.sent
    bridged = flow_state_event(pipeline_id=P, batch_id=ours, flow_run_id=FLOW_RUN,
                               state_type=state_type, state_id=str(uuid.uuid4()),
                               message=message, ts=entered)
    assert bridged is not None
    seen = []
    for events in ([hooked, bridged], [bridged, hooked]):
        batch_id = await scheduled_batch(store)
        await store.apply([Event(e.type, batch_id, P, event_id=e.event_id, state=e.state,
                                 outcome=e.outcome, reason=e.reason, ts=e.ts,
                                 flow_run_id=e.flow_run_id) for e in events])
        batch = await store.get(P, batch_id)
        assert batch is not None
        seen.append((batch["outcome"], batch["reason"]))
    assert seen[0] == seen[1]


async def test_a_cancel_hook_that_runs_after_the_runs_completion_does_not_decide_it(
        store: BatchStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefect allows Cancelled -> Running -> Completed (a worker marks a claimed run
    Cancelled while its engine starts it), and the latest stop decides the outcome. The
    bridge's stops carry when Prefect entered each state, but the worker's cancellation hook
    stamped its stop with when the hook ran, seconds after the Cancelled state: a hook
    running after the run completed made the batch `cancelled`, every step `success`, while
    Prefect said Completed."""
    batch_id = await scheduled_batch(store)
    now = time.time()
    cancelled_at, completed_at = now - 10, now - 5
    completed = flow_state_event(pipeline_id=P, batch_id=batch_id, flow_run_id=FLOW_RUN,
                                 state_type="COMPLETED", state_id=str(uuid.uuid4()),
                                 ts=completed_at)
    assert completed is not None
    await store.apply([Event("batch.state", batch_id, P, event_id="run", state="running"),
                       completed])
    producer = hook_publisher(monkeypatch)
    state: State[Any] = Cancelled(message="stopped through the batches API",
                                  timestamp=datetime.fromtimestamp(cancelled_at, UTC))
    await run_hook("on_cancellation", batch_id, state)  # the hook runs now
    assert [e.outcome for e in producer.sent] == ["cancelled"]
    await store.apply(producer.sent)
    batch = await store.get(P, batch_id)
    assert batch is not None
    assert (batch["state"]["state"], batch["outcome"]) == ("stop", "completed")


@pytest.mark.parametrize("entered", ["2099-01-01T00:00:00+00:00", "1960-01-01T00:00:00+00:00"])
async def test_a_hook_of_a_state_stamped_out_of_range_still_publishes_its_stop(
        store: BatchStore, monkeypatch: pytest.MonkeyPatch, entered: str) -> None:
    """The hooks stamp their stop with the state's own time: one a worker's clock far off put
    years ahead made the stop's construction raise (the codec refuses it), and one before
    1970 was dead-lettered. It goes through the bridge's range: a guess, ts 0."""
    producer = hook_publisher(monkeypatch)
    state: State[Any] = State(type=StateType.COMPLETED, message="",
                              timestamp=datetime.fromisoformat(entered))
    await run_hook("on_completion", await scheduled_batch(store), state)
    [stop] = producer.sent
    assert (stop.state, stop.outcome, stop.ts) == ("stop", "completed", 0.0)
    assert decode_event(stop.encode()).to_dict() == stop.to_dict()


@pytest.mark.timeout(120)
async def test_a_stop_does_not_report_an_earlier_batchs_run_of_the_same_id(
        topics: Settings, redis: Redis) -> None:
    """A published id used again after its batch and claim expired: Prefect hands back the
    earlier batch's run for the id, so the run command makes one of this batch's own
    (`of_an_earlier_batch`), but both carry the id's tags. A stop found both by their tags
    and reported the earlier one's Completed as this batch's end: GET said stop/completed
    while this batch's run was still being cancelled (its steps never ran to the end)."""
    async with idle_pool(topics, redis) as pool:
        batch_id = await pool.batch()
        earlier = await pool.run(batch_id)
        await pool.client.set_flow_run_state(UUID(earlier), Completed(), force=True)
        # This batch's run command made a run of its own; the batch was created over an
        # hour after the earlier run (its creation time moved instead of the test waiting).
        own = await pool.client.create_flow_run_from_deployment(
            pool.deployment_id, idempotency_key=f"{batch_id}@own",
            tags=[*flow_run_tags(batch_id, pool.pipeline_id, "1"), pool.scope_tag],
            parameters={"batch_id": batch_id, "pipeline_id": pool.pipeline_id,
                        "pipeline_version": "1"})
        assert own.created is not None
        created_at = (own.created + timedelta(seconds=EARLIER_BATCH_S)).isoformat()
        await redis.hset(keys.batch(pool.pipeline_id, batch_id), "created_at", created_at)
        await pool.client.set_flow_run_state(own.id, Running(), force=True)
        store = BatchStore.from_settings(redis, topics)
        await store.apply([Event("batch.state", batch_id, pool.pipeline_id,
                                 event_id=f"sched-{own.id}", state="scheduled",
                                 flow_run_id=str(own.id)),
                           Event("batch.state", batch_id, pool.pipeline_id, event_id="run",
                                 state="running", flow_run_id=str(own.id))])
        async with running(EventsConsumer(topics, options())), \
                running(CommandsConsumer(topics, options())):
            await send_command(topics, "stop", pool.pipeline_id, batch_id)

            async def follow_up_queued() -> bool:
                return await redis.zscore(keys.CLEANUP_DUE,
                                          f"stop/{pool.pipeline_id}/{batch_id}") is not None
            await eventually(follow_up_queued, timeout=30)
            assert await pool.state_of(str(own.id)) == "CANCELLING"
            # Whatever the stop published went before this mark, on the batch's partition.
            mark = Event("step.offsets", batch_id, pool.pipeline_id, step="extract",
                         offsets={"mark": 1})
            await send(topics, topics.topic_events, batch_id, mark.encode())

            async def applied() -> bool:
                fields = await store.fields(pool.pipeline_id, batch_id)
                return fields is not None and "off:extract:mark" in fields
            await eventually(applied, timeout=30)
        batch = await store.get(pool.pipeline_id, batch_id)
        assert batch is not None
        assert (batch["state"]["state"], batch.get("outcome")) == ("running", None)


async def batch_of_a_reused_id(pool: IdlePool, redis: Redis) -> str:
    """A batch whose id's earlier batch left a Completed run, made well before it (its
    `created_at` moved past that run's creation instead of the test waiting)."""
    batch_id = await pool.batch()
    earlier = await pool.run(batch_id)
    await pool.client.set_flow_run_state(UUID(earlier), Completed(), force=True)
    [run] = await pool.client.read_flow_runs(flow_run_filter=FlowRunFilter(
        id=FlowRunFilterId(any_=[UUID(earlier)])))
    assert run.created is not None
    created_at = (run.created + timedelta(seconds=2 * EARLIER_BATCH_S)).isoformat()
    await redis.hset(keys.batch(pool.pipeline_id, batch_id), "created_at", created_at)
    return batch_id


@pytest.mark.timeout(90)
async def test_the_reconciler_does_not_take_an_earlier_batchs_run_for_this_ones(
        topics: Settings, redis: Redis) -> None:
    """A batch indexed as live whose run id Redis has not recorded (its event lost, or a
    rebuild) is looked up by its tags, which an earlier batch of the same id shares: the
    reconciler took that batch's Completed run for this one's, and a batch whose run had not
    run yet said stop/completed (and its run command then skipped it as stopped)."""
    async with idle_pool(topics, redis) as pool:
        batch_id = await batch_of_a_reused_id(pool, redis)
        await ActiveRuns(redis).add(pool.pipeline_id, batch_id)
        async with reconciler_without_sweep(topics, zombie_after_s=0) as reconciler:
            events = await reconciler.reconcile()
    assert [(e.state, e.outcome) for e in events if e.batch_id == batch_id] == []


@pytest.mark.parametrize("entered", ["2099-01-01T00:00:00+00:00", "1960-01-01T00:00:00+00:00"])
@pytest.mark.parametrize("name", ["flow_run_completed", "task_run_completed"])
def test_a_state_stamped_out_of_range_still_reaches_the_batch(name: str, entered: str) -> None:
    """A run whose worker's clock is off (a state stamped years ahead, or before 1970) was
    translated with that time, which the events codec refuses: the event was dead-lettered
    (after the webhook had answered 202 `accepted: 1`), and the reconciler's repair, stamped
    the same, too, every round: the batch stayed `running` for ever. Such a time says
    nothing of when the run entered the state: it is a guess (ts 0) that any real time
    beats, the same each time the state is translated again. "Now" made each replay of a
    state stamped ahead the latest stop, so a replay flipped a decided outcome."""
    event = copy.deepcopy(DATA[name])
    event["resource"]["prefect.state-timestamp"] = entered
    event["occurred"] = entered
    [out] = translate(event)
    assert decode_event(out.encode()).to_dict() == out.to_dict()
    assert out.ts == 0.0 and translate(copy.deepcopy(event))[0].ts == 0.0
    repaired = flow_state_event(pipeline_id=P, batch_id="b", flow_run_id=FLOW_RUN,
                                state_type="COMPLETED", state_id=str(uuid.uuid4()),
                                ts=datetime.fromisoformat(entered).timestamp())
    assert repaired is not None and repaired.ts == 0.0
    assert decode_event(repaired.encode()).to_dict() == repaired.to_dict()


@pytest.mark.timeout(90)
async def test_a_runs_real_end_beats_the_reconcilers_guess_that_it_is_gone(
        topics: Settings, redis: Redis) -> None:
    """A run that completed and was then deleted in Prefect (its UI, a clean-up of old
    runs) while the bridge was behind: the reconciler finds no run and guesses `crashed`,
    stamped with when it looked; the bridge's replay of the run's Completed then carries an
    earlier time and lost to the guess for good, though it is what happened."""
    async with idle_pool(topics, redis) as pool:
        batch_id = await pool.batch()
        flow_run_id = await pool.scheduled(batch_id)
        result: Any = await pool.client.set_flow_run_state(UUID(flow_run_id), Completed(),
                                                           force=True)
        assert result.state is not None
        completed = flow_state_event(
            pipeline_id=pool.pipeline_id, batch_id=batch_id, flow_run_id=flow_run_id,
            state_type="COMPLETED", state_id=str(result.state.id),
            ts=result.state.timestamp.timestamp())
        assert completed is not None
        await pool.client.delete_flow_run(UUID(flow_run_id))
        async with reconciler_without_sweep(topics, zombie_after_s=0) as reconciler:
            events = await reconciler.reconcile()
    [gone] = [e for e in events if e.batch_id == batch_id and e.state == "stop"]
    assert gone.outcome == "crashed"
    store = BatchStore.from_settings(redis, topics)
    await store.apply([gone])
    await store.apply([completed])  # the bridge, caught up
    batch = await store.get(pool.pipeline_id, batch_id)
    assert batch is not None
    assert (batch["state"]["state"], batch["outcome"]) == ("stop", "completed")


@pytest.mark.timeout(90)
async def test_a_given_up_run_does_not_take_an_earlier_batchs_end_for_its_own(
        topics: Settings, redis: Redis) -> None:
    """A run command given up (Prefect refusing its creates) first asks Prefect whether the
    batch's run ended meanwhile, by the id's tags: an id published again after it expired
    found the earlier batch's Completed run, and the batch that never ran said
    stop/completed instead of failed."""
    async with idle_pool(topics, redis) as pool:
        batch_id = await batch_of_a_reused_id(pool, redis)
        consumer = CommandsConsumer(topics, options())
        await consumer.start()
        try:
            ended = await consumer._ended_run(Command(
                "run", batch_id, pool.pipeline_id, pipeline_version="1"))
        finally:
            await consumer.close()
    assert ended is None, f"reported {ended}"


@pytest.mark.timeout(90)
async def test_a_task_state_stamped_out_of_range_does_not_blind_the_reconciler(
        topics: Settings, redis: Redis) -> None:
    """The reconciler brings a repaired run's step ends from its task runs, stamped when
    each entered its state: one stamped years ahead (a worker's clock far off) made the
    step event's construction raise, and with it every round: no batch's missed state was
    published again."""
    async with idle_pool(topics, redis) as pool:
        batch_id = await pool.batch()
        flow_run_id = await pool.scheduled(batch_id)
        await pool.client.set_flow_run_state(UUID(flow_run_id), Completed(), force=True)
        async with reconciler_without_sweep(topics, zombie_after_s=0) as reconciler:
            assert reconciler.prefect is not None
            ahead = datetime(2099, 1, 1, tzinfo=UTC).timestamp()

            async def step_ends(run_id: str) -> dict[str, tuple[str, str, float]]:
                return {"extract": ("success", str(uuid.uuid4()), ahead)}

            reconciler.prefect.step_ends = step_ends  # type: ignore[method-assign,assignment]
            events = await reconciler.reconcile()
    assert [(e.type, e.state) for e in events if e.batch_id == batch_id] == [
        ("step.state", "success"), ("batch.state", "stop")]
    for event in events:
        assert decode_event(event.encode()).to_dict() == event.to_dict()


async def test_a_task_crashed_after_its_step_reported_success_leaves_the_success(
        store: BatchStore) -> None:
    """A cancel (or a kill) landing after the step's SDK published `success` and before
    Prefect's task engine recorded Completed makes the task run Crashed, stamped later: the
    bridge's `failed` replaced the success of a step whose work was done."""
    batch_id = await scheduled_batch(store)
    reported = time.time() - 2
    await store.apply([
        Event("step.state", batch_id, P, step="extract", state="running"),
        Event("step.offsets", batch_id, P, step="extract", offsets={"partition_0": 100}),
        Event("step.state", batch_id, P, step="extract", state="success", ts=reported)])
    crashed = captured("task_run_crashed", batch_id)
    crashed["resource"]["prefect.resource.name"] = "extract"
    crashed["resource"]["prefect.state-timestamp"] = datetime.fromtimestamp(
        reported + 0.05, UTC).isoformat()
    await store.apply(translate(crashed))
    batch = await store.get(P, batch_id)
    assert batch is not None and batch["state"]["steps"]["extract"]["state"] == "success"


async def test_a_task_crashed_without_an_end_of_its_steps_own_fails_the_step(
        store: BatchStore) -> None:
    batch_id = await scheduled_batch(store)
    await store.apply([Event("step.state", batch_id, P, step="extract", state="running")])
    crashed = captured("task_run_crashed", batch_id)
    crashed["resource"]["prefect.resource.name"] = "extract"
    await store.apply(translate(crashed))
    batch = await store.get(P, batch_id)
    assert batch is not None and batch["state"]["steps"]["extract"]["state"] == "failed"


async def test_the_reconcilers_step_ends_give_a_crashed_task_run_as_a_guess(
        test_settings: Settings) -> None:
    """The reconciler's repair path took a Crashed task run's time as the step's end, so it
    failed a step whose own `success` came earlier, as the bridge did."""
    now = datetime.now(UTC)

    def task_run(name: str, kind: StateType, at: datetime) -> Any:
        return SimpleNamespace(name=name, state=SimpleNamespace(
            type=kind, timestamp=at, id=uuid.uuid4()))

    runs = [task_run("extract", StateType.CRASHED, now),
            task_run("load", StateType.COMPLETED, now - timedelta(seconds=1)),
            task_run("load", StateType.CANCELLED, now - timedelta(seconds=2))]
    gateway = PrefectGateway(test_settings, 5.0)  # its client never opened: replaced below

    async def read_task_runs(**_: Any) -> list[Any]:
        return runs

    gateway.client = cast(Any, SimpleNamespace(read_task_runs=read_task_runs))
    ends = await gateway.step_ends(str(uuid.uuid4()))
    assert ends["extract"][0::2] == ("failed", 0.0)
    assert ends["load"][0::2] == ("success", (now - timedelta(seconds=1)).timestamp())
