"""The orphan sweep: flow runs of this service that no batch will ever report on.

Every path that gives up on a batch should cancel its flow runs, but a process can die
between the two, a create can land in Prefect after the batch's delete, a POST can purge a
batch whose run command was written after all. So the reconciler also walks Prefect's
non-final runs tagged `dhub` and judges each by its batch in Redis:

- batch missing (purged, or never recorded) -> cancelled, then deleted;
- batch hidden (`deleted`: a delete is under way) -> cancelled, then deleted;
- batch `stop` -> cancelled (the batch keeps showing its run), unless the run ended once
  and lives again (retried or rerun in Prefect after its end, its own events decide the
  batch; a Cancelled -> Running race's run, too), or the batch's clean-up job is queued
  (the job cancels it, and knows its Cancelled for its own).

Safe against work in progress: nothing is judged within `grace_s` of the run's creation
(a POST may still be writing the batch hash) nor of the batch's last change (the commands
consumer is likely cancelling and deleting it itself). A run whose pipeline is not
registered in this Redis belongs to another deployment or database sharing the Prefect
server and is never touched. Bounded per round: at most `pages` pages of `FLOW_RUNS_PAGE`
runs and `actions` Prefect writes; the walk resumes where it stopped on the next round.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, cast

from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.asyncio import Redis

from consumers.plumbing.cleanup import member as cleanup_member
from consumers.plumbing.prefect_api import FINAL, FLOW_RUNS_PAGE, PrefectGateway, RunState
from core import keys
from core.layout import DELETED
from core.models import TAG_DHUB, batch_id_from_tags

log = logging.getLogger(__name__)
# How many runs known to have ended once the sweep keeps (a few hundred KB at most).
ENDED_KEPT: Final = 10_000


class OrphanOptions(BaseSettings):
    """The sweep's tunables (`DHUB_ORPHAN_*`)."""

    model_config = SettingsConfigDict(env_prefix="DHUB_ORPHAN_", extra="ignore")

    enabled: bool = True
    # Nothing younger than this (run creation, batch's last change) is judged.
    grace_s: float = 120.0
    pages: int = 5
    actions: int = 100
    # A run cancelled while started stays CANCELLING until its worker ends it; past this a
    # run that must be deleted is forced Cancelled (its worker may be gone).
    cancel_wait_s: float = 30.0


class Verdict(enum.Enum):
    GONE = "batch gone"
    HIDDEN = "batch deleted"
    STOPPED = "batch stopped"


@dataclass(slots=True)
class SweepReport:
    examined: int = 0
    cancelled: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    complete: bool = False  # the walk reached the last page this round


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


class OrphanSweep:
    def __init__(self, redis: Redis, prefect: PrefectGateway, options: OrphanOptions | None = None,
                 *, scope: list[str] | None = None) -> None:
        self._redis = redis
        self._prefect = prefect
        self.options = options or OrphanOptions()
        # Tags every swept run carries (tests narrow it to their own pipeline).
        self.scope = scope or [TAG_DHUB]
        self._offset = 0
        # Runs seen to have ended once. That never stops being true, and each one found
        # so costs a read of its state history: a retried run would cost it every round.
        self._ended: dict[str, None] = {}

    def _filter(self) -> FlowRunFilter:
        return FlowRunFilter(
            tags=FlowRunFilterTags(all_=self.scope),
            state=FlowRunFilterState(type=FlowRunFilterStateType(
                not_any_=[StateType(s) for s in sorted(FINAL)])),
        )

    async def sweep(self) -> SweepReport:
        """One bounded round of the walk."""
        report = SweepReport()
        budget = self.options.actions
        for _ in range(self.options.pages):
            page = await self._prefect.client.read_flow_runs(
                flow_run_filter=self._filter(), sort=FlowRunSort.ID_DESC,
                limit=FLOW_RUNS_PAGE, offset=self._offset)
            report.examined += len(page)
            left, budget = await self._judge_page(page, budget, report)
            # Runs that became final left the filter: the next page starts that much earlier.
            self._offset += len(page) - left
            if len(page) < FLOW_RUNS_PAGE:
                self._offset = 0
                report.complete = True
                break
            if budget <= 0:
                break
        if report.cancelled or report.deleted:
            log.info("orphan sweep: cancelled %d, deleted %d flow run(s) of %d examined",
                     len(report.cancelled), len(report.deleted), report.examined)
        return report

    async def _judge_page(self, page: list[FlowRun], budget: int,
                          report: SweepReport) -> tuple[int, int]:
        """Acts on the page's orphans; returns how many left the filter, and the budget."""
        verdicts = await self._verdicts(page)
        left = 0
        for run in page:
            verdict = verdicts.get(str(run.id))
            if verdict is None or budget <= 0:
                continue
            budget -= 1
            if await self._act(run, verdict, report):
                left += 1
        return left, budget

    async def _verdicts(self, page: list[FlowRun]) -> dict[str, Verdict]:
        now = datetime.now(UTC)
        grace = timedelta(seconds=self.options.grace_s)
        owners: dict[str, tuple[str, str]] = {}
        for run in page:
            owner = batch_id_from_tags(list(run.tags))
            if owner is not None and run.created is not None and run.created <= now - grace:
                owners[str(run.id)] = owner
        if not owners:
            return {}
        pipelines = sorted({p for p, _ in owners.values()})
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.smismember(keys.PIPELINES, pipelines)
            for pipeline_id, batch_id in owners.values():
                pipe.hmget(keys.batch(pipeline_id, batch_id), "state", DELETED, "updated_at")
            replies = await pipe.execute()
        ours = {p for p, known in zip(pipelines, cast(list[int], replies[0]), strict=True) if known}
        rows = cast(list[list[str | None]], replies[1:])
        verdicts: dict[str, Verdict] = {}
        for (run_id, (pipeline_id, _)), (state, deleted, updated) in zip(
                owners.items(), rows, strict=True):
            if pipeline_id not in ours:
                continue
            if state is None:
                verdicts[run_id] = Verdict.GONE
                continue
            changed = _parse_time(updated)
            if changed is not None and changed > now - grace:
                continue  # the commands consumer is most likely on it right now
            if deleted is not None:
                verdicts[run_id] = Verdict.HIDDEN
            elif state == "stop":
                verdicts[run_id] = Verdict.STOPPED
        return await self._without_cleanups(verdicts, owners)

    async def _without_cleanups(self, verdicts: dict[str, Verdict],
                                owners: dict[str, tuple[str, str]]) -> dict[str, Verdict]:
        """A stopped batch whose clean-up is queued (a give-up's `cancel`, a stop's
        follow-up) is that job's: cancelled by the sweep first, a given-up batch's run would
        end Cancelled unknown to the job, which says the failure again only over the runs it
        cancelled itself, and the batch would read `cancelled`."""
        stopped = [run_id for run_id, verdict in verdicts.items()
                   if verdict is Verdict.STOPPED]
        if not stopped:
            return verdicts
        async with self._redis.pipeline(transaction=False) as pipe:
            for run_id in stopped:
                for kind in ("cancel", "stop"):
                    pipe.zscore(keys.CLEANUP_DUE, cleanup_member(kind, *owners[run_id]))
            queued = await pipe.execute()
        for n, run_id in enumerate(stopped):
            if queued[2 * n] is not None or queued[2 * n + 1] is not None:
                del verdicts[run_id]
        return verdicts

    async def _ended_once(self, run_id: str) -> bool:
        if run_id in self._ended:
            return True
        if not await self._prefect.ended_once(run_id):
            return False
        if len(self._ended) >= ENDED_KEPT:
            del self._ended[next(iter(self._ended))]  # the oldest: read again if still live
        self._ended[run_id] = None
        return True

    async def _act(self, run: FlowRun, verdict: Verdict, report: SweepReport) -> bool:
        """Cancels (and, for a batch gone or hidden, deletes) the run; True when it is no
        longer a non-final run."""
        state = before = RunState.of(run)
        message = f"orphan flow run: {verdict.value}"
        if verdict is Verdict.STOPPED:
            if state.state_type == "CANCELLING":
                # Its worker ends it, or the clean-up of the stop or give-up that cancelled
                # it. Forced Cancelled here, it would reach the batch as its latest stop and
                # replace the outcome and reason it has (a give-up's `failed`) with the sweep's.
                return False
            if await self._ended_once(str(run.id)):
                return False
        if state.state_type == "CANCELLING":
            since = state.since or datetime.now(UTC)
            waited = datetime.now(UTC) - since >= timedelta(seconds=self.options.cancel_wait_s)
            if waited:
                state = await self._prefect.force_cancelled(state, message)
        else:
            state = await self._prefect.cancel(state, message)
        if state.state_type == before.state_type:
            return False
        report.cancelled.append(state.flow_run_id)
        log.warning("orphan sweep: flow run %s (%s): %s -> %s", state.flow_run_id,
                    ",".join(run.tags), verdict.value, state.state_type)
        if verdict is not Verdict.STOPPED and state.final:
            await self._prefect.delete(state.flow_run_id)
            report.deleted.append(state.flow_run_id)
        return state.final
