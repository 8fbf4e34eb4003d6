"""The few Prefect API calls the consumers make, each bounded in time.

A hung Prefect counts as unavailable after `prefect_timeout_s` (a `TimeoutError`, which the
callers retry); Prefect's own client retries 429/502/503 inside that bound.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar
from uuid import UUID

import httpx
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas import OrchestrationResult
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterTags
from prefect.client.schemas.objects import FlowRun
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventResourceFilter,
)
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings
from prefect.states import Cancelled, Cancelling, Crashed

from consumers.plumbing.metrics import Latencies
from core.models import TAG_BATCH_PREFIX, TAG_PIPELINE_PREFIX, flow_run_tags, is_uuid
from core.prefect_events import GUESSED_TASK_STATES, TASK_STATES
from core.settings import Settings

T = TypeVar("T")
FINAL: Final = frozenset({"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})
NOT_STARTED: Final = frozenset({"SCHEDULED", "PENDING"})
FLOW_RUN_RESOURCE: Final = "prefect.flow-run."
# The server refuses larger pages (422): flow-run filters by PREFECT_SERVER_API_DEFAULT_LIMIT
# (200 by default), events by its interactive page size (50). Every read is chunked to them.
FLOW_RUNS_PAGE: Final = 200
EVENTS_PAGE: Final = 50


def chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def not_found(exc: BaseException) -> bool:
    """Prefect's client raises ObjectNotFound for some 404s and a bare status error for
    others (creating a flow run of a missing deployment)."""
    if isinstance(exc, ObjectNotFound):
        return True
    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 404


@dataclass(frozen=True, slots=True)
class RunState:
    """What the consumers need to know of a flow run."""

    flow_run_id: str
    state_type: str | None
    state_id: str | None
    message: str | None
    since: datetime | None = None  # when it entered this state
    ran: bool = False  # its engine started it (Prefect set a start time)
    created: datetime | None = None  # when Prefect made it
    tags: tuple[str, ...] = ()

    @property
    def final(self) -> bool:
        return self.state_type in FINAL

    @property
    def started(self) -> bool:
        return self.state_type is not None and self.state_type not in NOT_STARTED

    @classmethod
    def of(cls, run: FlowRun) -> RunState:
        state = run.state
        return cls(
            flow_run_id=str(run.id),
            state_type=state.type.value if state is not None else None,
            state_id=str(state.id) if state is not None else None,
            message=state.message if state is not None else None,
            since=state.timestamp if state is not None else None,
            ran=run.start_time is not None,
            created=run.created,
            tags=tuple(run.tags),
        )


# How much older than its batch a flow run of the same id must be to be an earlier batch's:
# far above any clock skew between the API and Prefect, far below a retention period.
EARLIER_BATCH_S: Final = 3600.0


def of_an_earlier_batch(run: RunState, created_at: str) -> bool:
    """Whether Prefect handed back, for the idempotency key that is the batch id, a flow run
    it made for an earlier batch of the same id (published again after its batch and claim
    expired): one made well before this batch was created."""
    if run.created is None or not created_at:
        return False
    born = datetime.fromisoformat(created_at.replace("Z", "+00:00"))
    return run.created < born - timedelta(seconds=EARLIER_BATCH_S)


def of_another_pipeline(run: RunState, pipeline_id: str) -> bool:
    """Whether the run is tagged as another pipeline's. Prefect keeps an idempotency key
    unique per flow, and every pipeline's deployment is of the one flow: creating a run
    keyed by a batch id hands back the run of that id's batch in another pipeline (an id
    published to a second pipeline). A run with no pipeline tag is not judged."""
    own = TAG_PIPELINE_PREFIX + pipeline_id
    theirs = [tag for tag in run.tags if tag.startswith(TAG_PIPELINE_PREFIX)]
    return bool(theirs) and own not in theirs


class PrefectGateway:
    def __init__(self, settings: Settings, timeout: float) -> None:
        auth = get_current_settings().api.auth_string
        self._timeout = timeout
        self.latencies = Latencies()  # by call, failures and timeouts included
        self.client = PrefectClient(
            settings.prefect_api_url,
            auth_string=auth.get_secret_value() if auth is not None else None,
            httpx_settings={"timeout": httpx.Timeout(timeout)},
        )

    async def open(self) -> None:
        await self.client.__aenter__()

    async def close(self) -> None:
        await self.client.__aexit__(None, None, None)

    async def _bounded(self, name: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout):
                return await call
        finally:
            self.latencies.observe(name, time.perf_counter() - started)

    async def create_run(self, deployment_id: UUID, batch_id: str, pipeline_id: str,
                         pipeline_version: str, key: str | None = None) -> RunState:
        """Idempotent by batch id (or `key`): a replayed run command gets the same flow run
        back."""
        run = await self._bounded("create_run", self.client.create_flow_run_from_deployment(
            deployment_id,
            parameters={"batch_id": batch_id, "pipeline_id": pipeline_id,
                        "pipeline_version": pipeline_version},
            idempotency_key=key or batch_id,
            tags=flow_run_tags(batch_id, pipeline_id, pipeline_version),
        ))  # fmt: skip
        return RunState.of(run)

    async def read(self, flow_run_ids: list[str]) -> dict[str, RunState]:
        """The flow runs that still exist, by id (deleted ones are simply absent)."""
        found: dict[str, RunState] = {}
        # An id that is no UUID names no flow run (the codec refuses such ids today; a hash
        # may hold one from before): skipped, not a ValueError failing the caller's round.
        flow_run_ids = [i for i in flow_run_ids if is_uuid(i)]
        for chunk in chunks(flow_run_ids, FLOW_RUNS_PAGE):
            runs = await self._bounded("read_runs", self.client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(i) for i in chunk])),
                limit=len(chunk),
            ))  # fmt: skip
            found.update((str(r.id), RunState.of(r)) for r in runs)
        return found

    async def step_ends(self, flow_run_id: str) -> dict[str, tuple[str, str, float]]:
        """The final state of each step of a flow run as its task runs hold it: step name ->
        (step state, Prefect state id, when it was entered), the latest task run of a step
        deciding. A task run is named after its step once Running (pipelines/flow.py). A
        Crashed or Cancelled one's time is 0, a guess (`GUESSED_TASK_STATES`): the end its
        step reported itself beats it."""
        if not is_uuid(flow_run_id):
            return {}
        runs = await self._bounded("read_task_runs", self.client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])),
            limit=200,
        ))  # fmt: skip
        ends: dict[str, tuple[str, str, float]] = {}
        latest: dict[str, float] = {}
        for run in runs:
            state = run.state
            mapped = TASK_STATES.get(state.type.value) if state is not None else None
            if state is None or mapped not in ("success", "failed"):
                continue
            entered = state.timestamp.timestamp()
            if run.name not in latest or entered > latest[run.name]:
                latest[run.name] = entered
                guessed = state.type.value in GUESSED_TASK_STATES
                ends[run.name] = (mapped, str(state.id), 0.0 if guessed else entered)
        return ends

    async def of_batch(self, pipeline_id: str, batch_id: str, known: str | None = None,
                       created_at: str = "") -> list[RunState]:
        """Every flow run of the batch: the one Redis knows plus any found by its tags (a run
        created by a command whose effect was not recorded yet). By the pipeline's tag too: a
        command naming the wrong pipeline must not reach the runs of another pipeline's batch
        of that id. Given the batch's `created_at`, without the runs of an earlier batch of
        the same id (published again after it expired), which share its tags: their ends
        are not this batch's."""
        tags = [TAG_BATCH_PREFIX + batch_id, TAG_PIPELINE_PREFIX + pipeline_id]
        runs = await self._bounded("read_runs", self.client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=tags)), limit=50,
        ))  # fmt: skip
        found = {str(r.id): RunState.of(r) for r in runs}
        if known and known not in found:
            found.update(await self.read([known]))
        # The known run is checked too: a hash may hold another pipeline's run (one handed
        # back for the same batch id before `create_run`'s callers checked the pipeline).
        return [run for run in found.values() if not of_an_earlier_batch(run, created_at)
                and not of_another_pipeline(run, pipeline_id)]

    async def cancel(self, run: RunState, message: str) -> RunState:
        """Asks Prefect to cancel: proposed, never forced, so its orchestration decides on the
        run's state as it is at that moment, atomically. A Scheduled run (no worker has it)
        becomes Cancelled at once, and a worker's later Pending proposal is then refused; a
        Pending or Running one becomes Cancelling, and its final state comes from the
        engine and its worker. Forcing Cancelled onto a Pending run lost the race to the
        engine, which may still propose Running (accepted from Cancelled) and complete."""
        if run.final or run.state_type == "CANCELLING":
            return run
        result: OrchestrationResult[Any] = await self._bounded("set_state",
            self.client.set_flow_run_state(run.flow_run_id, Cancelling(message=message),
                                           force=False))
        if result.state is None:  # aborted: it was final meanwhile
            return (await self.read([run.flow_run_id])).get(run.flow_run_id, run)
        return self._with(run, result.state)

    async def force_cancelled(self, run: RunState, message: str) -> RunState:
        """Only for a run whose batch is gone or failed already (nothing left to agree with)."""
        return await self._set(run, Cancelled(message=message))

    async def _set(self, run: RunState, state: Any) -> RunState:
        """Forced: a decision about a run no batch reports on any more, not a proposal."""
        result: OrchestrationResult[Any] = await self._bounded("set_state",
            self.client.set_flow_run_state(run.flow_run_id, state, force=True)
        )
        return run if result.state is None else self._with(run, result.state)

    @staticmethod
    def _with(run: RunState, new: Any) -> RunState:
        return RunState(run.flow_run_id, new.type.value, str(new.id), new.message, new.timestamp,
                        run.ran, run.created, run.tags)

    async def with_heartbeat(self, flow_run_ids: list[str], since: datetime) -> set[str]:
        """Which of these flow runs emitted a heartbeat event since `since` (their engine
        process is alive; it beats every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds)."""
        alive: set[str] = set()
        until = datetime.now(UTC)
        for chunk in chunks(flow_run_ids, EVENTS_PAGE):
            # distinct: one event per resource, so a page of EVENTS_PAGE covers the chunk.
            events = await self._bounded("read_events", self.client.read_events(
                EventFilter(
                    occurred=EventOccurredFilter.model_validate({"since": since, "until": until}),
                    event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
                    resource=EventResourceFilter(
                        id=[FLOW_RUN_RESOURCE + i for i in chunk], distinct=True),
                ),
                limit=len(chunk),
            ))  # fmt: skip
            alive.update(e.resource.id.removeprefix(FLOW_RUN_RESOURCE) for e in events.events)
        return alive

    async def crash(self, run: RunState, message: str) -> RunState:
        """A zombie's verdict, proposed, never forced: it rests on a read made earlier in the
        round, and the run may have ended meanwhile (Prefect then refuses a Crashed over its
        Completed, and the run as it is now is answered). A Cancelling one is ended
        Cancelled: Prefect lets nothing else follow Cancelling, and refused, the run would
        stay Cancelling, its batch `running`, for good."""
        state: Any = (Cancelled(message=message) if run.state_type == "CANCELLING"
                      else Crashed(message=message))
        result: OrchestrationResult[Any] = await self._bounded("set_state",
            self.client.set_flow_run_state(run.flow_run_id, state, force=False))
        if result.state is None:  # aborted: final meanwhile
            return (await self.read([run.flow_run_id])).get(run.flow_run_id, run)
        return self._with(run, result.state)

    async def ended_once(self, flow_run_id: str) -> bool:
        """Whether the run was ever in a final state (a run live again was retried or rerun
        in Prefect after it ended)."""
        states = await self._bounded("read_states",
                                     self.client.read_flow_run_states(UUID(flow_run_id)))
        return any(state.type.value in FINAL for state in states)

    async def delete(self, flow_run_id: str) -> bool:
        """False when it was already gone."""
        try:
            await self._bounded("delete_run", self.client.delete_flow_run(UUID(flow_run_id)))
        except ObjectNotFound:
            return False
        return True
