"""Batches a rebuild restores from their run commands (issue 12: everything Redis holds can be
rebuilt from Kafka).

A batch's first snapshot is written when the commands consumer takes its run command
(`core.snapshots`). A batch the API created whose run command was still waiting on the
commands topic when Redis was lost has no snapshot yet: its run command carries what the API
recorded (`Recorded`: its sequence, creation time and fields beyond a fresh batch's), from
which the same hash is built again (`core.layout.creation_fields`). After the rebuild the
commands consumer takes that run command as usual (its group's committed offset is before
it), so the batch runs as it would have.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping

from core.command_messages import Recorded, Run
from core.layout import creation_fields
from core.snapshots import PipelineVersion, Snapshot

log = logging.getLogger(__name__)


def recorded_of(command: Run) -> Recorded | None:
    return command.recorded if isinstance(command.recorded, Recorded) else None


def from_run_commands(runs: Mapping[tuple[str, str], Run], versions: Iterable[PipelineVersion],
                      snapshots: Iterable[Snapshot], purged: set[tuple[str, str]]
                      ) -> list[Snapshot]:
    """The creation snapshots of the batches a run command recorded that the snapshots topic
    does not hold (neither a snapshot nor a tombstone: a purged batch stays purged). The
    sequences of `snapshots` and of those are made unique again (`resequence`)."""
    specs = {(v.pipeline_id, v.spec.version): v.spec for v in versions}
    held = list(snapshots)
    known = {(s.pipeline_id, s.batch_id) for s in held} | purged
    out: list[Snapshot] = []
    for (pipeline_id, batch_id), run in runs.items():
        recorded = recorded_of(run)
        if recorded is None or (pipeline_id, batch_id) in known:
            continue
        spec = specs.get((pipeline_id, run.pipeline_version))
        if spec is None:
            log.warning("run command of %s/%s names version %s, which the pipelines topic "
                        "does not hold: not restored", pipeline_id, batch_id,
                        run.pipeline_version)
            continue
        flat = creation_fields(pipeline_id, batch_id, spec, recorded.created_at, recorded.extra)
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        fields["seq"] = str(recorded.seq)
        out.append(Snapshot(pipeline_id, batch_id, fields))
    resequence([*held, *out])
    _raise_created_at(held, out)
    return out


def resequence(snapshots: Iterable[Snapshot]) -> None:
    """Where two batches of a pipeline hold one sequence, Redis's counter went back between
    their creations (an AOF that lost its last second: the batches created in it are gone
    from Redis, not from the topics, and the next batches took their sequences again), and a
    list continuing strictly below one of them would never show the other. Those batches
    are walked in creation order (`created_at`, then sequence): each whose sequence is not
    above every one before it is given the next past them all, and so is each after it. The
    batches before the counter went back keep theirs (a paging token from before still
    continues as it did); a pipeline with no sequence twice is left as it is."""
    by_pipeline: dict[str, list[Snapshot]] = defaultdict(list)
    for snap in snapshots:
        if snap.seq > 0:  # a hash with no sequence is listed as it was (at 0)
            by_pipeline[snap.pipeline_id].append(snap)
    for rows in by_pipeline.values():
        seqs = [snap.seq for snap in rows]
        if len(set(seqs)) == len(seqs):
            continue
        top = 0
        for snap in sorted(rows, key=lambda s: (s.fields.get("created_at", ""), s.seq)):
            if snap.seq > top:
                top = snap.seq
            else:
                top += 1
                log.warning("batch %s/%s: sequence %d held by an earlier batch too (Redis's "
                            "counter went back): restored as %d", snap.pipeline_id,
                            snap.batch_id, snap.seq, top)
                snap.fields["seq"] = str(top)


def idempotency_records(runs: Iterable[Run], now: float, ttl_s: int
                        ) -> list[tuple[str, str, int]]:
    """(Redis key, committed record, seconds left) of each Idempotency-Key the API committed
    for these runs and that has not expired yet (it was committed about when its run
    command was sent: `Command.ts`)."""
    out: list[tuple[str, str, int]] = []
    for run in runs:
        recorded = recorded_of(run)
        if recorded is None or not recorded.idempotency_key:
            continue
        left = int(ttl_s - (now - run.ts))
        if left > 0:
            out.append((recorded.idempotency_key, recorded.idempotency_record, left))
    return out


def highest_seqs(runs: Iterable[Run]) -> dict[str, int]:
    """Per pipeline, the highest sequence the API's runs recorded: the batches of the highest
    may have been purged since, and their sequences must not be handed out again."""
    out: dict[str, int] = {}
    for run in runs:
        recorded = recorded_of(run)
        if recorded is not None and recorded.seq > out.get(run.pipeline_id, 0):
            out[run.pipeline_id] = recorded.seq
    return out


def _raise_created_at(held: list[Snapshot], restored: list[Snapshot]) -> None:
    """CREATE_BATCH's rule again: a batch's `created_at` is raised to the newest one of the
    batches before it in its pipeline's sequence (two API processes whose clocks differ), and
    an `updated_at` below it too. The API's record carries the time it sent, so the rebuild
    applies the rule to what the other batches hold."""
    by_pipeline: dict[str, list[tuple[int, bool, Snapshot]]] = defaultdict(list)
    for snap in held:
        by_pipeline[snap.pipeline_id].append((snap.seq, False, snap))
    for snap in restored:
        by_pipeline[snap.pipeline_id].append((snap.seq, True, snap))
    for rows in by_pipeline.values():
        newest = ""
        for _, ours, snap in sorted(rows, key=lambda row: row[0]):
            at = snap.fields.get("created_at", "")
            if ours and at < newest:
                snap.fields["created_at"] = at = newest
                if snap.fields.get("updated_at", "") < at:
                    snap.fields["updated_at"] = at
            newest = max(newest, at)
