"""The commands consumer: run, stop and delete commands turned into Prefect calls.

Commands of one batch share a partition (keyed by batch id), so they are handled in order;
partitions are handled concurrently. A command's offset is committed only after its
effect; while Prefect, Redis or Kafka are unavailable the command is retried in place with
capped backoff and stays uncommitted, so neither a crash nor a shutdown loses it. A
command that can never succeed is dead-lettered with the reason (and a run or stop leaves
the batch `stop`/`failed`, so nobody waits on it forever).
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from redis.asyncio import Redis

from consumers.active import ActiveRuns
from consumers.deployments import Deployments, EnsureFn, default_ensure
from consumers.dlq import DeadLetters
from consumers.emit import Emitter
from consumers.kafka import Record, commit_retrying, open_consumer
from consumers.options import ConsumerOptions
from consumers.part import Part, close_all
from consumers.prefect_api import PrefectGateway, RunState, not_found
from core.codec import CodecError, Command, Event, decode_command
from core.connections import open_producer, open_redis
from core.models import PipelineSpec
from core.prefect_events import flow_state_event
from core.registry import PipelineRegistry
from core.retry import Backoff, Permanent, Stopping, describe
from core.scripts import Scripts
from core.settings import Settings
from core.store import BatchStore

log = logging.getLogger(__name__)
STOP_MESSAGE = "stopped through the batches API"
DELETE_MESSAGE = "deleted through the batches API"


class CommandsConsumer(Part):
    name = "commands"

    def __init__(self, settings: Settings, options: ConsumerOptions | None = None, *,
                 ensure: EnsureFn | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.options = options or ConsumerOptions()
        self._ensure = ensure
        self.backoff = Backoff(self.stopping, self.options.retry_policy())
        self._redis: Redis | None = None
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self.prefect: PrefectGateway | None = None

    async def start(self) -> None:
        s = self.settings
        ensure = self._ensure or default_ensure()
        self._redis = redis = await open_redis(s)
        scripts = Scripts(redis)
        self.store = BatchStore.from_settings(redis, s, scripts)
        self.registry = PipelineRegistry(redis, scripts)
        self.active = ActiveRuns(redis)
        self.deployments = Deployments(s, ensure)
        self.prefect = PrefectGateway(s, self.options.prefect_timeout_s)
        await self.prefect.open()
        self._producer = await open_producer(s)
        self.emitter = Emitter(self._producer, s.topic_events, self.store)
        self.dlq = DeadLetters(self._producer, s.topic_dlq, self.name)
        self._consumer = await open_consumer(s, self.name, s.topic_commands, s.group_commands,
                                             max_poll_records=self.options.commands_max_records)

    async def close(self) -> None:
        await close_all(self._consumer, self._producer, self.prefect, self._redis)

    # -- the loop ------------------------------------------------------------------------

    async def _loop(self) -> None:
        assert self._consumer is not None
        while not self.stopping.is_set():
            batch = await self._consumer.getmany(timeout_ms=self.options.poll_timeout_ms,
                                                 max_records=self.options.commands_max_records)
            if batch:
                await asyncio.gather(*(self._partition(tp, recs) for tp, recs in batch.items()))

    async def _partition(self, tp: TopicPartition, records: list[Record]) -> None:
        assert self._consumer is not None
        for record in records:
            # Shutdown finishes the command in flight; the rest is delivered again later.
            if self.stopping.is_set():
                return
            try:
                await self.handle(record)
                done = await commit_retrying(self._consumer, {tp: record.offset + 1},
                                             self.backoff)
            except Stopping:
                return
            if not done:
                return

    async def handle(self, record: Record) -> None:
        """One command, to its durable effect or to the dead letters. Raises `Stopping`."""
        try:
            command = decode_command(record.value)
        except CodecError as exc:
            reason = f"malformed command: {exc}"
            log.warning("%s at %s:%d:%d", reason, record.topic, record.partition, record.offset)
            await self.backoff.call("dead-letter", lambda: self.dlq.send_and_wait(record, reason))
            return
        what = f"{command.type} {command.pipeline_id}/{command.batch_id}"
        try:
            await self.backoff.call(what, lambda: self.apply(command))
        except Stopping:
            raise
        except Exception as exc:
            reason = f"{command.type} failed: {describe(exc)}"
            log.error("%s: permanent error, dead-lettered: %s", what, reason,
                      exc_info=not isinstance(exc, Permanent))
            await self.backoff.call(what, lambda: self._reject(record, command, reason))

    async def apply(self, command: Command) -> None:
        if command.type == "run":
            await self._run(command)
        elif command.type == "stop":
            await self._stop(command)
        elif command.type == "deploy":
            await self._deploy(command)
        else:
            await self._delete(command)

    async def _reject(self, record: Record, command: Command, reason: str) -> None:
        if command.type == "deploy":
            pass  # no batch waits on it; the dead letter tells the operator
        elif command.type == "delete":
            # The batch is already hidden; its Prefect side failed, its Redis side need not.
            await self.active.remove(command.pipeline_id, command.batch_id)
            await self.store.purge(command.pipeline_id, command.batch_id)
        else:
            await self.emitter.emit([Event(
                type="batch.state", batch_id=command.batch_id, pipeline_id=command.pipeline_id,
                event_id=f"fail-{command.event_id}", state="stop", outcome="failed",
                reason=reason,
            )])  # fmt: skip
        await self.dlq.send_and_wait(record, reason)

    # -- the commands --------------------------------------------------------------------

    async def _deploy(self, command: Command) -> None:
        """Creates or updates the pipeline version's deployment right after registration,
        so its first run does not pay for it (a run ensures it again if it went missing)."""
        spec = await self.registry.get(command.pipeline_id, command.pipeline_version)
        if spec is None:
            raise Permanent(f"unknown pipeline version {command.pipeline_id!r} "
                            f"{command.pipeline_version!r}")
        self.deployments.forget(command.pipeline_id, spec.version)
        deployment_id = await self.deployments.id_for(command.pipeline_id, spec)
        log.info("deploy %s %s: deployment %s", command.pipeline_id, spec.version, deployment_id)

    async def _fields(self, command: Command) -> dict[str, str] | None:
        fields = await self.store.fields(command.pipeline_id, command.batch_id)
        if fields is None or "deleted" in fields:
            return None
        return fields

    async def _run(self, command: Command) -> None:
        fields = await self._fields(command)
        if fields is None or fields.get("state") == "stop":
            log.info("run %s skipped: batch %s", command.batch_id,
                     "gone" if fields is None else "already stopped")
            return
        version = fields.get("pipeline_version") or command.pipeline_version
        spec = await self.registry.get(command.pipeline_id, version or None)
        if spec is None:
            raise Permanent(f"unknown pipeline version {command.pipeline_id!r} {version!r}")
        run = await self._create_run(command, spec.version, spec)
        await self.active.add(command.pipeline_id, command.batch_id)
        await self.emitter.emit([Event(
            type="batch.state", batch_id=command.batch_id, pipeline_id=command.pipeline_id,
            event_id=f"sched-{run.flow_run_id}", state="scheduled", flow_run_id=run.flow_run_id,
        )])  # fmt: skip
        log.info("run %s: flow run %s (%s)", command.batch_id, run.flow_run_id, run.state_type)

    async def _create_run(self, command: Command, version: str, spec: PipelineSpec) -> RunState:
        assert self.prefect is not None
        for attempt in (1, 2):
            deployment_id = await self.deployments.id_for(command.pipeline_id, spec)
            try:
                return await self.prefect.create_run(deployment_id, command.batch_id,
                                                     command.pipeline_id, version)
            except Exception as exc:
                if not not_found(exc):
                    raise
                # Deleted behind our back: ensure it again once, then give up.
                self.deployments.forget(command.pipeline_id, version)
                if attempt == 2:
                    raise Permanent(f"deployment of {spec.name!r} missing after ensure") \
                        from None
        raise AssertionError("unreachable")

    async def _stop(self, command: Command) -> None:
        assert self.prefect is not None
        fields = await self._fields(command)
        if fields is None or fields.get("state") == "stop":
            return
        runs = await self.prefect.of_batch(command.batch_id, fields.get("flow_run_id"))
        events: list[Event] = []
        if not runs:
            events.append(Event(
                type="batch.state", batch_id=command.batch_id, pipeline_id=command.pipeline_id,
                event_id=f"stop-{command.batch_id}", state="stop", outcome="cancelled",
                reason="stopped before it started",
            ))  # fmt: skip
        for run in runs:
            now = await self.prefect.cancel(run, STOP_MESSAGE)
            # A run that had not started is Cancelled now; a started one is Cancelling and
            # its final state arrives from Prefect (bridge, hooks).
            if now.final and now.state_type is not None and now.state_id is not None:
                event = flow_state_event(
                    pipeline_id=command.pipeline_id, batch_id=command.batch_id,
                    flow_run_id=now.flow_run_id, state_type=now.state_type,
                    state_id=now.state_id, message=now.message,
                )
                if event is not None:
                    events.append(event)
        if events:
            await self.emitter.emit(events)
        log.info("stop %s: %s", command.batch_id,
                 ", ".join(f"{r.flow_run_id} {r.state_type}" for r in runs) or "no flow run")

    async def _delete(self, command: Command) -> None:
        assert self.prefect is not None
        fields = await self.store.fields(command.pipeline_id, command.batch_id)
        if fields is not None and "deleted" not in fields:
            await self.store.hide(command.pipeline_id, command.batch_id)
        known = fields.get("flow_run_id") if fields else None
        runs = await self.prefect.of_batch(command.batch_id, known)
        for run in runs:
            await self._cancel_and_delete(run)
        await self.active.remove(command.pipeline_id, command.batch_id)
        if fields is not None:
            await self.store.purge(command.pipeline_id, command.batch_id)
        log.info("delete %s: %d flow run(s) deleted", command.batch_id, len(runs))

    async def _cancel_and_delete(self, run: RunState) -> None:
        """Cancels first so a running flow's process is ended by its worker, which needs
        the flow run to exist; waits a bounded time for that, then deletes regardless."""
        assert self.prefect is not None
        now = await self.prefect.cancel(run, DELETE_MESSAGE)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.delete_cancel_wait_s
        while not now.final and loop.time() < deadline:
            await asyncio.sleep(0.25)
            found = await self.prefect.read([run.flow_run_id])
            if run.flow_run_id not in found:
                return
            now = found[run.flow_run_id]
        if not now.final:
            await self.prefect.force_cancelled(now, DELETE_MESSAGE)
        if run.started:
            # A run that executed has task-run events the server may not have stored yet;
            # deleting the run under them breaks Prefect's task-run recorder (foreign keys),
            # which then stalls every run's events. Let them settle first.
            await asyncio.sleep(self.options.delete_settle_s)
        await self.prefect.delete(run.flow_run_id)
