"""Tunables of the consumers only, read from `DHUB_*` like the shared settings.

Kept beside `core.settings.Settings` rather than in it: the API never reads them.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.retry import RetryPolicy


class ConsumerOptions(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DHUB_", extra="ignore")

    # Allocations between two young collections of Python's cyclic garbage collector in the
    # consumers process (Python's default: 700); 0 leaves Python's policy alone. See
    # `consumers.plumbing.collector`.
    gc_young_objects: int = Field(default=100_000, ge=0)
    # Retries of a command against an unavailable dependency: capped exponential backoff.
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0
    # Errors that may not pass (a Prefect 5xx, an OSError) are retried at most this often and
    # this long, then the command is dead-lettered; an unavailable dependency is waited out.
    retry_max_attempts: int = 8
    retry_max_elapsed_s: float = 120.0
    # How long a delete waits for a cancelled running flow run to reach a final state
    # before it forces Cancelled and deletes it anyway.
    delete_cancel_wait_s: float = 8.0
    # How long a delete waits after a run that executed is final before deleting it: Prefect
    # stores events in batches (every few seconds) and must not find their run gone.
    delete_settle_s: float = 5.0
    # Prefect API calls: a hung server counts as unavailable after this long.
    prefect_timeout_s: float = 15.0
    # A batch given up or deleted is cleaned up (its flow runs cancelled, deleted) off the
    # commands' path, durably (a Redis queue). Its runs are looked up by tag again until this
    # long after the clean-up began: a create that timed out on our side can still land in
    # Prefect after the delete looked (keep it above 2 x prefect_timeout_s).
    cleanup_recheck_s: float = 35.0
    cleanup_poll_s: float = 0.5
    # A deleted batch's data that a resume not yet stopped goes on from is kept; the delete
    # looks again this often (a resume may wait in Prefect's queue for a long time).
    cleanup_resume_poll_s: float = 10.0
    # A stop that finds its run Pending (a worker starting it) cancels it once it runs; if it
    # is still Pending after this long (a worker gone), it is cancelled as it is.
    stop_pending_wait_s: float = 60.0
    # A run a stop (or a give-up's clean-up) left Cancelling that is still Cancelling after
    # this long has no engine to end it (it finished meanwhile; Prefect refuses anything but
    # Cancelled): ended Cancelled.
    stop_cancelling_wait_s: float = 30.0
    # A run a stop left Cancelling before its engine ever started is the worker's to end; one
    # still Cancelling after this long has no worker coming (it died with the claim) and is
    # ended Cancelled. Should its engine still start it and complete, Prefect's later
    # Completed decides the batch's outcome too (the latest stop wins), so they never disagree.
    stop_unstarted_wait_s: float = 120.0
    cleanup_concurrency: int = 8
    # A clean-up pass claimed by one process; another may take it over after this long.
    cleanup_lease_s: float = 60.0

    commands_max_records: int = 100
    # A rebalance waits this long for a revoked partition's command in flight to finish
    # (its retries stop at once); the rest is left to the new owner, uncommitted.
    revoke_wait_s: float = 20.0
    # Kafka drops a member that does not poll for this long; the loop polls every
    # poll_timeout_ms whatever its commands cost, so the default is plenty.
    commands_max_poll_interval_ms: int = 300_000
    events_max_records: int = 20_000
    # Offsets events read by the C scanner (core.offsets_scan) rather than decoded one by
    # one; off, every event is decoded in Python (the same outcome, at ~1.4x the CPU).
    events_scan: bool = True
    # The events consumer snapshots and commits what it applied at most this often (and at
    # once when the stream pauses): a batch changed by many polls meanwhile is snapshotted
    # once. A crash re-applies up to about this much (idempotent); nothing waits on it to
    # be visible.
    events_flush_interval_s: float = 0.5
    poll_timeout_ms: int = 250

    # The reconciler: how often, and how many active batches per round.
    reconcile_interval_s: float = 10.0
    reconcile_batch: int = 500
    # The retention sweeper (consumers.retention): how often, and how many expired batches
    # per pipeline and round (the rest wait for the next round). A batch of 0 read no hour
    # (LIMIT 0 0: nothing was ever removed), a negative one a bucket but its last id; an
    # interval of 0 ran rounds back to back.
    retention_interval_s: float = Field(default=60.0, gt=0)
    retention_batch: int = Field(default=500, ge=1)
    # A running flow run without a heartbeat event for this long is declared Crashed
    # (0: never). Prefect's engine beats every PREFECT_FLOWS_HEARTBEAT_FREQUENCY (180 s by
    # default, 30 s at least): keep this a few beats long.
    zombie_after_s: float = 600.0
    # A flow run a worker claimed (Pending) and has not started for this long is declared
    # Crashed (0: never): its worker stopped between the two, and Prefect has no lease on
    # Pending, so the batch would read `scheduled` for ever. A process worker starts a run
    # in seconds; keep this above the slowest infrastructure's start (image pulls...).
    pending_after_s: float = 600.0
    # The bridge asks Prefect to replay from its last checkpoint minus this margin (Prefect
    # serves at most 15 min of backfill), since task-run events may arrive out of order.
    bridge_replay_margin_s: float = 60.0
    bridge_checkpoint_every_s: float = 2.0
    # After each (re)connect, replay the window once more this much later: Prefect's
    # backfill reads its database, which lags the live stream by up to the event
    # persister's flush interval (5 s by default).
    bridge_catchup_s: float = 10.0

    heartbeat_ttl_s: int = 10
    heartbeat_every_s: float = 3.0
    shutdown_timeout_s: float = 30.0

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(initial_s=self.retry_initial_s, cap_s=self.retry_max_s,
                           max_attempts=self.retry_max_attempts,
                           max_elapsed_s=self.retry_max_elapsed_s)
