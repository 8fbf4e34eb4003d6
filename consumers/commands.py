"""The commands consumer: run, stop and delete commands turned into Prefect calls.

Commands of one batch share a partition (keyed by batch id), so they are handled in order;
partitions are handled concurrently, each by its own lane (consumers.plumbing.lanes), while the poll
loop goes on polling. A command's offset is committed only after its effect; while Prefect,
Redis or Kafka are unavailable the command is retried in place with capped backoff and
stays uncommitted, so neither a crash nor a shutdown loses it. A deterministic failure is
retried a bounded number of times and time (core.retry), then dead-lettered with the
reason; a run or stop given up leaves the batch `stop`/`failed` and every flow run of the
batch is cancelled (consumers.plumbing.cleanup), so nobody waits on it and nothing runs for it.

Every command is idempotent, so a rebalance that delivers one again shows no second
effect: a run by Prefect's idempotency key (the batch id) and event ids derived from the
flow run or state; a stop does nothing to a stopped batch or a Cancelling run; a delete
queues one clean-up job per batch. The slow part of a delete runs off this path.

A run published by an upstream service carries its creation request and creates its batch
first, once per id (consumers.plumbing.creation); one refused there (invalid, conflicting)
is only dead-lettered: the batch its id names, if any, is not its to fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaConsumer

from consumers.plumbing.active import ActiveRuns
from consumers.plumbing.cleanup import Cleanup
from consumers.plumbing.command_effects import CommandEffects
from consumers.plumbing.creation import Creations, Refused
from consumers.plumbing.deployments import Deployments, EnsureFn, default_ensure
from consumers.plumbing.dlq import DeadLetters
from consumers.plumbing.emit import Emitter
from consumers.plumbing.kafka import Record, open_consumer
from consumers.plumbing.lanes import Lanes
from consumers.plumbing.options import ConsumerOptions
from consumers.plumbing.part import Clients, Part
from consumers.plumbing.prefect_api import PrefectGateway
from core.codec import CodecError, Command, Event, decode_command, derived_id
from core.prefect_events import flow_state_event
from core.registry import PipelineRegistry
from core.retry import Backoff, Permanent, Stopping, describe
from core.scripts import Scripts
from core.settings import Settings
from core.snapshots import SnapshotWriter
from core.store import BatchStore

log = logging.getLogger(__name__)


class CommandsConsumer(Part):
    name = "commands"

    def __init__(self, settings: Settings, options: ConsumerOptions | None = None, *,
                 ensure: EnsureFn | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.options = options or ConsumerOptions()
        self._ensure = ensure
        # Retries outside any lane (dead-lettering a malformed record); lanes have their own.
        self.backoff = Backoff(self.stopping, self.options.retry_policy())
        self.lanes = Lanes(self.name, self.handle, self.options.retry_policy(),
                           self.options.revoke_wait_s)
        self._consumer: AIOKafkaConsumer | None = None
        self.prefect: PrefectGateway | None = None
        # For the metrics: commands by (type, outcome), and their retries by type.
        self.handled: dict[tuple[str, str], int] = {}
        self.retried: dict[str, int] = {}

    async def _open(self, clients: Clients, scope: contextlib.AsyncExitStack) -> None:
        s = self.settings
        ensure = self._ensure or default_ensure()
        redis = clients.redis
        scripts = Scripts(redis)
        self.store = BatchStore.from_settings(redis, s, scripts)
        self.registry = PipelineRegistry(redis, scripts)
        self.creations = Creations(redis, self.store, self.registry,
                                   retention_days=s.batch_retention_days)
        self.active = ActiveRuns(redis)
        self.deployments = Deployments(s, ensure)
        self.prefect = prefect = PrefectGateway(s, self.options.prefect_timeout_s)
        await prefect.open()
        scope.push_async_callback(prefect.close)
        self.emitter = Emitter(clients.producer, s.topic_events, self.store)
        self.snapshots = SnapshotWriter(clients.producer, redis, s.topic_snapshots)
        self.dlq = DeadLetters(clients.producer, s.topic_dlq, self.name)
        self.cleanup = Cleanup(redis, prefect, self.store, self.active, self.options,
                               self.stopping, data_root=s.data_root, snapshots=self.snapshots,
                               emitter=self.emitter)
        self.effects = CommandEffects(self.store, self.registry, self.creations, self.active,
                                      self.deployments, prefect, self.emitter, self.snapshots,
                                      self.cleanup, work_pool=s.work_pool)
        self._consumer = await open_consumer(
            s, self.name, s.topic_commands, s.group_commands, listener=self.lanes,
            revoke_wait_s=self.options.revoke_wait_s,
            max_poll_records=self.options.commands_max_records,
            max_poll_interval_ms=self.options.commands_max_poll_interval_ms)
        scope.push_async_callback(self._consumer.stop)
        self.lanes.consumer = self._consumer

    # -- the loop ------------------------------------------------------------------------

    @property
    def retries(self) -> int:
        return self.backoff.retries + self.lanes.retries

    def request_stop(self) -> None:
        super().request_stop()
        self.lanes.halt_all()

    async def _loop(self) -> None:
        assert self._consumer is not None
        cleanup = asyncio.create_task(self.cleanup.run(), name="commands clean-up")
        try:
            while not self.stopping.is_set():
                # Partitions with a lane at work are paused: this returns the others' records
                # and keeps the group membership alive, however long a command takes.
                batch = await self._consumer.getmany(
                    timeout_ms=self.options.poll_timeout_ms,
                    max_records=self.options.commands_max_records)
                for tp, records in batch.items():
                    if records:
                        self.lanes.start(tp, records)
        finally:
            # Shutdown finishes the commands in flight (and commits them); the rest is
            # delivered again later. A clean-up pass cut short is resumed from Redis.
            self.lanes.halt_all()
            if not self.stopping.is_set():  # the loop failed: the clean-up stops too
                cleanup.cancel()
            await asyncio.gather(self.lanes.drain(self.options.shutdown_timeout_s), cleanup,
                                 return_exceptions=True)

    async def handle(self, record: Record, backoff: Backoff | None = None) -> None:
        """One command, to its durable effect or to the dead letters. Raises `Stopping`."""
        backoff = backoff or self.backoff
        try:
            command = decode_command(record.value)
        except CodecError as exc:
            reason = f"malformed command: {exc}"
            log.warning("%s at %s:%d:%d", reason, record.topic, record.partition, record.offset)
            await backoff.call("dead-letter",
                               lambda: self.dlq.send_and_wait(record, reason, "malformed"))
            self._count("malformed", "dead_lettered")
            return
        what = f"{command.type} {command.pipeline_id}/{command.batch_id}"
        retries = backoff.retries  # the lane's own: one command at a time
        try:
            await backoff.call(what, lambda: self.apply(command))
            outcome = "done"
        except Stopping:
            raise
        except Exception as exc:
            refused = isinstance(exc, Refused)
            reason = f"{command.type} {'refused' if refused else 'failed'}: {describe(exc)}"
            await self._give_up(record, command, reason, refused, backoff)
            log.error("%s: permanent error, dead-lettered: %s", what, reason,
                      exc_info=not isinstance(exc, Permanent))
            outcome = "dead_lettered"
        finally:
            if backoff.retries != retries:
                self.retried[command.type] = (self.retried.get(command.type, 0)
                                              + backoff.retries - retries)
        self._count(command.type, outcome)

    def _count(self, kind: str, outcome: str) -> None:
        self.handled[(kind, outcome)] = self.handled.get((kind, outcome), 0) + 1

    async def apply(self, command: Command) -> None:
        await self.effects.apply(command)

    async def _give_up(self, record: Record, command: Command, reason: str, refused: bool,
                       backoff: Backoff) -> None:
        """Gives the command up; when that fails too (the batch's own data breaks the
        script that records its failure, say), dead-letters the record alone with both
        reasons: retrying it for ever would block every later command of its partition.
        Raises `Stopping`, or the dead letter's own error (the topic itself refusing)."""
        what = f"give up {command.type} {command.pipeline_id}/{command.batch_id}"
        try:
            await backoff.call(what, lambda: self._reject(record, command, reason, refused))
        except Stopping:
            raise
        except Exception as exc:
            both = f"{reason}; giving it up failed too: {describe(exc)}"
            log.error("%s failed; dead-lettering the command alone", what, exc_info=True)
            await backoff.call(what, lambda: self.dlq.send_and_wait(record, both, "gave_up"))

    async def _reject(self, record: Record, command: Command, reason: str,
                      refused: bool = False) -> None:
        failure: Event | None = None
        if command.type == "deploy" or refused:
            pass  # no batch waits on it (or not on this one); the dead letter says why
        elif command.type == "delete":
            # Its Redis side is all this command does; the clean-up job does the rest.
            await self.cleanup.enqueue("delete", command.pipeline_id, command.batch_id)
        else:
            # A run's failure is as of the command's own time, so the final state of any
            # flow run it created (later by construction) beats it when that run's event
            # comes in late. A stop's is a guess any real end beats: its run was there
            # before it, and may have ended before the stop was even sent (the batch not yet
            # showing it). When Prefect already holds an end, that is the outcome at once.
            failure = await self._ended_run(command) or Event(
                type="batch.state", batch_id=command.batch_id, pipeline_id=command.pipeline_id,
                event_id=derived_id("fail-", command.event_id), state="stop", outcome="failed",
                reason=reason, ts=command.ts if command.type == "run" else 0.0,
            )  # fmt: skip
            # Given up, so nothing may run for it: a flow run created before the failure, or
            # whose create is still in flight inside Prefect, is cancelled by the clean-up.
            await self.active.remove(command.pipeline_id, command.batch_id)
            await self.cleanup.enqueue("cancel", command.pipeline_id, command.batch_id)
        if failure is not None:
            # Shown after the clean-up is queued: a redelivered command finding its batch
            # stopped is skipped, so nothing it owes may come after the failure but the
            # dead letter (a script that cannot record the failure dead-letters the command
            # with both reasons instead: `_give_up`).
            await self.emitter.emit([failure])
        await self.dlq.send_and_wait(record, reason, "gave_up")

    async def _ended_run(self, command: Command) -> Event | None:
        """The event of the batch's flow run that has already ended, if Prefect says so (a
        run created by a try whose answer was lost may have run to its end). Best effort:
        Prefect may be why the command was given up."""
        if self.prefect is None:
            return None
        try:
            async with asyncio.timeout(self.options.prefect_timeout_s):
                fields = await self.store.fields(command.pipeline_id, command.batch_id)
                # Without an earlier batch's run of this id (published again after it
                # expired): it did not run this batch.
                runs = await self.prefect.of_batch(
                    command.pipeline_id, command.batch_id,
                    created_at=(fields or {}).get("created_at", ""))
        except Exception as exc:
            log.warning("%s %s: its batch or its flow runs not read before giving up (%s)",
                        command.type, command.batch_id, describe(exc))
            return None
        ended = [(r.since, r.state_type, r.state_id, r) for r in runs
                 if r.final and r.state_type and r.state_id and r.since is not None]
        if not ended:
            return None
        since, state_type, state_id, run = max(ended, key=lambda row: row[0])
        return flow_state_event(
            pipeline_id=command.pipeline_id, batch_id=command.batch_id,
            flow_run_id=run.flow_run_id, state_type=state_type, state_id=state_id,
            message=run.message, ts=since.timestamp())
