"""Every Redis key name the project uses, built in one place.

Keys that belong to one pipeline carry the hash tag `{pipeline_id}` so that the multi-key
scripts touching them land in one slot on Redis Cluster.
"""

from __future__ import annotations

from typing import Final

from core.models import BATCH_STATES, OUTCOMES

PREFIX = "dhub"

# Set of every registered pipeline id (global, outside any pipeline's slot).
PIPELINES = f"{PREFIX}:pipelines"
# Pub/sub channel carrying the key of every batch hash that changed (cache invalidation). A
# message is the key alone, or the key, a newline and the hash as it is after the change (a
# JSON object; consumers before 2026-12-04 sent an array field, value, field, value, ...:
# `core.layout.published_fields` reads both), which lets a cache that holds the batch take
# the new value without reading Redis. An API from before reads only the array: upgrade the
# APIs before the consumers (the other order logs an error per change until it is done).
CHANGES_CHANNEL = f"{PREFIX}:changes"
# Pub/sub channel: the commands consumer has just created a flow run in the work pool the
# message names. A worker following it (pipelines/worker_nudges.py) looks for scheduled runs
# at once instead of at its next poll; a message lost is a poll's wait, nothing more.
WORKER_NUDGES_CHANNEL = f"{PREFIX}:worker-nudges"
# Set with a TTL by a running consumer process; its presence means "consumers alive".
HEARTBEAT_CONSUMERS = f"{PREFIX}:heartbeat:consumers"
# Written (with a short TTL) by the API's readiness probe: a Redis that answers PING but
# takes no write (READONLY replica, OOM, LOADING) is not ready.
READY_PROBE = f"{PREFIX}:api:ready-probe"


def _tag(pipeline_id: str) -> str:
    return f"{PREFIX}:{{{pipeline_id}}}"


def batch(pipeline_id: str, batch_id: str) -> str:
    """Hash: the batch's fields, step states (`step:<name>`) and offsets (`off:<step>:<part>`)."""
    return f"{_tag(pipeline_id)}:batch:{batch_id}"


def batch_ids(key: str) -> tuple[str, str] | None:
    """(pipeline_id, batch_id) of a `batch` key (as change messages carry), else None."""
    head = f"{PREFIX}:{{"
    if not key.startswith(head):
        return None
    pipeline_id, sep, batch_id = key[len(head):].partition("}:batch:")
    return (pipeline_id, batch_id) if sep and pipeline_id and batch_id else None


def batch_purged(pipeline_id: str, batch_id: str) -> str:
    """String, for `PURGED_MARK_S` after the batch's purge: a snapshot's writer that finds
    the hash gone once its record is sent tombstones the batch again only with this mark
    there, since a hash gone without one is Redis having lost it, and the batch's snapshot is
    what a rebuild restores it from."""
    return f"{_tag(pipeline_id)}:purged:{batch_id}"


# A day: the snapshots topic's delete.retention.ms, past which the purge's tombstone itself
# may be compacted away; a snapshot write held up longer (Kafka away a day) is past saving.
# ~100 bytes a purged batch meanwhile.
PURGED_MARK_S = 86_400


def batch_seen(pipeline_id: str, batch_id: str) -> str:
    """Sorted set of the batch's most recent event ids, for de-duplication."""
    return f"{_tag(pipeline_id)}:seen:{batch_id}"


def batch_index(pipeline_id: str) -> str:
    """Sorted set batch id -> creation sequence: latest batch and paged listing."""
    return f"{_tag(pipeline_id)}:batches"


# The states with an index of their own: a batch passes through them, so each holds few
# batches. `stop`, where every batch ends, has none: a stopped batch always has an outcome
# (APPLY_EVENTS sets one with the stop), so the `state=stop` page merges the outcome indexes.
INDEXED_STATES: Final[tuple[str, ...]] = tuple(s for s in BATCH_STATES if s != "stop")


def batch_state_index(pipeline_id: str, state: str) -> str:
    """Sorted set batch id -> creation sequence of the visible batches in `state` (the list's
    `state` filter; `INDEXED_STATES` only): a filtered page costs what an unfiltered one
    does, whatever the history."""
    return f"{_tag(pipeline_id)}:batches:state:{state}"


def batch_outcome_index(pipeline_id: str, outcome: str) -> str:
    """Sorted set batch id -> creation sequence of the visible batches with that `outcome`
    (every visible stopped batch is in exactly one)."""
    return f"{_tag(pipeline_id)}:batches:outcome:{outcome}"


def batch_filter_indexes(pipeline_id: str) -> list[str]:
    """Every indexed state's index (`INDEXED_STATES` order), then every outcome's
    (`OUTCOMES` order): the scripts that move or hide a batch are given them all (Redis
    Cluster needs a script's keys named), and find a state's or an outcome's by its position."""
    return ([batch_state_index(pipeline_id, state) for state in INDEXED_STATES]
            + [batch_outcome_index(pipeline_id, outcome) for outcome in OUTCOMES])


# The last part of the finished index's name; a finished bucket's last part is its hour.
FINISHED_HOURS: Final = "hours"


def batch_finished_hour(pipeline_id: str, hour: str) -> str:
    """List of the ids of the batches that reached `stop` in that UTC hour (`YYYYMMDDHH`),
    in stop order (RPUSH by APPLY_EVENTS): the retention sweeper's buckets, a listpack
    entry (~30 bytes) per finished batch. Hide and purge leave an id in its bucket: the
    sweeper skips ids whose batch is gone or hidden. Lua builds the same name from the
    finished index's (`core.list_scripts.HOURS_LUA`)."""
    return f"{_tag(pipeline_id)}:batches:finished:{hour}"


def batch_finished_index(pipeline_id: str) -> str:
    """Sorted set hour (`YYYYMMDDHH`) -> its start (unix seconds), one member per hour that
    has a bucket (`batch_finished_hour`): the sweeper finds its expired buckets with one
    ZRANGEBYSCORE, and a round costs O(log hours + expired) whatever the history."""
    return batch_finished_hour(pipeline_id, FINISHED_HOURS)


# The finished buckets' marker's name after the pipeline's hash tag (CREATE_BATCH builds it).
FINISHED_INDEXED: Final = "batches:finished:indexed:2"


def batch_finished_indexed(pipeline_id: str) -> str:
    """Set once the finished buckets hold every stopped batch that predates them: by the
    backfill (`core.paging.ensure_finished`), or by the pipeline's first create
    (CREATE_BATCH: no batch predates it, and the sweeper's backfill would bucket the
    pipeline's stopped batches a second time)."""
    return f"{_tag(pipeline_id)}:{FINISHED_INDEXED}"


def batch_indexes_built(pipeline_id: str) -> str:
    """Set once the filter indexes hold every batch that predates them."""
    return f"{_tag(pipeline_id)}:batches:indexed:2"


def batch_retired_keys(pipeline_id: str) -> list[str]:
    """The list's keys from before the finished buckets (issue 12: a finished batch in at
    most 1 KB): the `stop` state index, the created index, the finished sorted set (id ->
    stop time) and their markers. The backfills delete them (`core.paging`). (The created
    index was a lex-ordered sorted set `<created_at>|<seq>`; the list's created bounds are
    binary searches of the batch index now: `core.list_scripts.PAGE_RANGE`.)"""
    return [batch_state_index(pipeline_id, "stop"), f"{_tag(pipeline_id)}:batches:created",
            f"{_tag(pipeline_id)}:batches:finished", f"{_tag(pipeline_id)}:batches:indexed",
            f"{_tag(pipeline_id)}:batches:finished:indexed"]


def resumed_by(pipeline_id: str, batch_id: str) -> str:
    """Set of the ids of the resumes that go on from this batch's data (`service.resume`):
    while one has not stopped, the batch's delete is refused, since a resume takes the files
    over only when its first step starts."""
    return f"{_tag(pipeline_id)}:resumed-by:{batch_id}"


def deletes(pipeline_id: str, batch_id: str) -> str:
    """Set of the DELETEs of the batch under way, a token each (a short TTL): a resume noted
    while one is there refuses to go on from the batch's data (`BatchStore.begin_delete`)."""
    return f"{_tag(pipeline_id)}:deletes:{batch_id}"


def unsent_runs(pipeline_id: str) -> str:
    """Sorted set batch id -> when its create ran (ms, Redis's clock): the POSTs' batches whose
    run command Kafka has not been seen to take yet (`service.abandon` sends it again after
    a lease, should the POST's process have died before its send)."""
    return f"{_tag(pipeline_id)}:unsent-runs"


def batch_seq(pipeline_id: str) -> str:
    """Counter giving each new batch of the pipeline its creation sequence."""
    return f"{_tag(pipeline_id)}:seq"


def pipeline_versions(pipeline_id: str) -> str:
    """Hash version -> canonical JSON definition."""
    return f"{_tag(pipeline_id)}:pipeline"


def pipeline_order(pipeline_id: str) -> str:
    """List of versions in registration order; the last one is `latest`."""
    return f"{_tag(pipeline_id)}:pipeline:order"


def cleanup_cancelled(job: str) -> str:
    """Set of the flow runs a `cancel` clean-up job (its CLEANUP_DUE member) cancelled
    itself: the Cancelled of those alone is the give-up's doing. Added to, never rewritten
    (two processes may run the same pass)."""
    return f"{PREFIX}:cleanup:cancelled:{job}"


def idempotency(key_digest: str) -> str:
    """Idempotency-Key record; global (own slot) so a key reused on another pipeline is seen."""
    return f"{PREFIX}:idem:{{{key_digest}}}"


def published(batch_id: str) -> str:
    """String (JSON): the pipeline, version and effective config a batch id published on the
    commands topic was claimed for, and whether the batch was deleted since. Global (own
    slot), like the Idempotency-Key records: the same id published for two pipelines is one
    conflict, not two batches."""
    return f"{PREFIX}:published:{{{batch_id}}}"


# Sorted set "<pipeline_id>/<batch_id>" -> last check time: batches whose flow run may be live,
# walked by the reconciler. Global: one index over all pipelines, single-key commands only.
ACTIVE_RUNS = f"{PREFIX}:active-runs"
# ISO time of the newest Prefect event the bridge forwarded (where to resume after a restart).
BRIDGE_CHECKPOINT = f"{PREFIX}:bridge:checkpoint"
# Sorted set JSON [pipeline_id, batch_id, version] -> time: batches the API abandoned after an
# ambiguous run command (or delete), whose delete command is still to be queued on Kafka.
# Global: drained by any API process, single-key commands only.
ABANDONED = f"{PREFIX}:api:abandoned"
# The commands consumer's off-path clean-ups (deletes, given-up runs, stop follow-ups):
# sorted set "<kind>/<pipeline_id>/<batch_id>" -> next pass (unix time), and a hash of the
# same members -> when the clean-up began. Global, single-key commands only.
CLEANUP_DUE = f"{PREFIX}:cleanup"
CLEANUP_SINCE = f"{PREFIX}:cleanup:since"
