"""Every Redis key name the project uses, built in one place.

Keys that belong to one pipeline carry the hash tag `{pipeline_id}` so that the multi-key
scripts touching them land in one slot on Redis Cluster.
"""

from __future__ import annotations

from core.models import BATCH_STATES, OUTCOMES

PREFIX = "dhub"

# Set of every registered pipeline id (global, outside any pipeline's slot).
PIPELINES = f"{PREFIX}:pipelines"
# Pub/sub channel carrying the key of every batch hash that changed (cache invalidation). A
# message is the key alone, or the key, a newline and the hash as it is after the change (a
# JSON array field, value, field, value, ...: `core.layout.published_fields`), which lets a
# cache that holds the batch take the new value without reading Redis.
CHANGES_CHANNEL = f"{PREFIX}:changes"
# Set with a TTL by a running consumer process; its presence means "consumers alive".
HEARTBEAT_CONSUMERS = f"{PREFIX}:heartbeat:consumers"


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


def batch_seen(pipeline_id: str, batch_id: str) -> str:
    """Sorted set of the batch's most recent event ids, for de-duplication."""
    return f"{_tag(pipeline_id)}:seen:{batch_id}"


def batch_index(pipeline_id: str) -> str:
    """Sorted set batch id -> creation sequence: latest batch and paged listing."""
    return f"{_tag(pipeline_id)}:batches"


def batch_state_index(pipeline_id: str, state: str) -> str:
    """Sorted set batch id -> creation sequence of the visible batches in `state` (the list's
    `state` filter): a filtered page costs what an unfiltered one does, whatever the history."""
    return f"{_tag(pipeline_id)}:batches:state:{state}"


def batch_outcome_index(pipeline_id: str, outcome: str) -> str:
    """Sorted set batch id -> creation sequence of the visible batches with that `outcome`."""
    return f"{_tag(pipeline_id)}:batches:outcome:{outcome}"


def batch_filter_indexes(pipeline_id: str) -> list[str]:
    """Every state's index (in `BATCH_STATES` order), then every outcome's (`OUTCOMES`
    order): the scripts that move or hide a batch are given them all (Redis Cluster needs a
    script's keys named), and find a state's or an outcome's by its position."""
    return ([batch_state_index(pipeline_id, state) for state in BATCH_STATES]
            + [batch_outcome_index(pipeline_id, outcome) for outcome in OUTCOMES])


def batch_created_index(pipeline_id: str) -> str:
    """Sorted set, every score 0, of `<created_at>|<seq, 16 digits>`, one member per visible
    batch: ZRANGEBYLEX turns the list's `created_after`/`created_before` into sequence bounds
    in O(log n). `created_at` is fixed-width (`2026-12-02T14:08:13.123Z`) and never decreases
    along the sequence (CREATE_BATCH raises one that would), so the members' order is the
    sequence's."""
    return f"{_tag(pipeline_id)}:batches:created"


def batch_finished_index(pipeline_id: str) -> str:
    """Sorted set batch id -> when it reached `stop` (unix seconds), one member per visible
    stopped batch: the retention sweeper reads only the expired ones (ZRANGEBYSCORE up to
    now minus the retention), so a round costs O(log n + expired) whatever the history."""
    return f"{_tag(pipeline_id)}:batches:finished"


def batch_finished_indexed(pipeline_id: str) -> str:
    """Set once the finished index holds every stopped batch that predates it."""
    return f"{_tag(pipeline_id)}:batches:finished:indexed"


def batch_indexes_built(pipeline_id: str) -> str:
    """Set once the filter and created indexes hold every batch that predates them."""
    return f"{_tag(pipeline_id)}:batches:indexed"


def batch_seq(pipeline_id: str) -> str:
    """Counter giving each new batch of the pipeline its creation sequence."""
    return f"{_tag(pipeline_id)}:seq"


def pipeline_versions(pipeline_id: str) -> str:
    """Hash version -> canonical JSON definition."""
    return f"{_tag(pipeline_id)}:pipeline"


def pipeline_order(pipeline_id: str) -> str:
    """List of versions in registration order; the last one is `latest`."""
    return f"{_tag(pipeline_id)}:pipeline:order"


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
